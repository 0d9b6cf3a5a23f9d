//! Ring enables QEMU sends before `SET_FEATURES`: held back and replayed
//! right after it (see the module documentation of `guard`).

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures};

use super::message::{Message, VERSION_1};
use super::GuardError;

/// Most rings an early enable may name (vhost-user's own queue limit).
pub(super) const MAX_RINGS: u32 = 256;

/// `SET_VRING_ENABLE` requests that arrived before `SET_FEATURES`, held back
/// until the features are set (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct EarlyEnables {
    /// `SET_FEATURES` has been forwarded.
    features_set: bool,
    /// Last requested state per ring index, in arrival order.
    held: Vec<(u32, u32)>,
}

impl EarlyEnables {
    /// Looks at a frontend message about to be forwarded. Returns `Hold`
    /// (with the reply the frontend waits for, if any) for an early
    /// `SET_VRING_ENABLE`, and the messages to send after it for `SET_FEATURES`.
    pub(super) fn filter(&mut self, msg: &Message) -> Result<Early, GuardError> {
        let req = msg.request();
        if req == FrontendReq::SET_VRING_ENABLE as u32 && !self.features_set {
            let Ok(body) = <[u8; 8]>::try_from(msg.body.as_slice()) else {
                // Malformed: let the backend refuse it.
                return Ok(Early::Forward(Vec::new()));
            };
            let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let num = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
            // One held state per ring, and no device has more rings than
            // this: what a frontend can make the guard hold is bounded.
            if index >= MAX_RINGS {
                return Err(GuardError::EarlyRing(index));
            }
            self.held.retain(|&(i, _)| i != index);
            self.held.push((index, num));
            let reply = (msg.flags() & VhostUserHeaderFlag::NEED_REPLY.bits() != 0).then(|| {
                Message::new(
                    req,
                    VhostUserHeaderFlag::REPLY.bits() | VERSION_1,
                    0u64.to_le_bytes().to_vec(),
                )
            });
            return Ok(Early::Hold(reply));
        }
        if req == FrontendReq::SET_FEATURES as u32 && !self.features_set {
            self.features_set = true;
            let acked = <[u8; 8]>::try_from(msg.body.as_slice())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let held = std::mem::take(&mut self.held);
            // Without PROTOCOL_FEATURES the backend enables every ring itself.
            if acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                return Ok(Early::Forward(Vec::new()));
            }
            let replay = held
                .into_iter()
                .map(|(index, num)| {
                    let mut body = index.to_le_bytes().to_vec();
                    body.extend_from_slice(&num.to_le_bytes());
                    // No NEED_REPLY: nobody waits for an answer.
                    Message::new(FrontendReq::SET_VRING_ENABLE as u32, VERSION_1, body)
                })
                .collect();
            return Ok(Early::Forward(replay));
        }
        Ok(Early::Forward(Vec::new()))
    }
}

/// What to do with one frontend message.
pub(super) enum Early {
    /// Forward it, then send these.
    Forward(Vec<Message>),
    /// Do not forward it; answer the frontend with this, if anything.
    Hold(Option<Message>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vring_enables_before_set_features_are_held_and_replayed() {
        let enable = |index: u32, num: u32, flags: u32| {
            let mut body = index.to_le_bytes().to_vec();
            body.extend_from_slice(&num.to_le_bytes());
            let mut m = Message::test(FrontendReq::SET_VRING_ENABLE, body, vec![]);
            m.header[4..8].copy_from_slice(&flags.to_le_bytes());
            m
        };
        let mut e = EarlyEnables::default();
        // Held; answered only when the frontend asks for a reply.
        assert!(matches!(
            e.filter(&enable(0, 1, 1)).unwrap(),
            Early::Hold(None)
        ));
        match e.filter(&enable(1, 0, 1 | 0x8)).unwrap() {
            Early::Hold(Some(r)) => {
                assert_eq!(r.request(), FrontendReq::SET_VRING_ENABLE as u32);
                assert_eq!(r.flags(), 0x5, "VERSION | REPLY");
                assert_eq!(r.body, 0u64.to_le_bytes());
            }
            _ => panic!("expected a held request with a reply"),
        }
        assert!(matches!(
            e.filter(&enable(1, 1, 1)).unwrap(),
            Early::Hold(None)
        ));
        // SET_FEATURES with PROTOCOL_FEATURES: forwarded, then the last state
        // of each ring is replayed, without NEED_REPLY.
        let features = (1u64 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let set = Message::test(
            FrontendReq::SET_FEATURES,
            features.to_le_bytes().to_vec(),
            vec![],
        );
        let Early::Forward(replay) = e.filter(&set).unwrap() else {
            panic!("SET_FEATURES must be forwarded");
        };
        let states: Vec<(Vec<u8>, u32)> =
            replay.iter().map(|m| (m.body.clone(), m.flags())).collect();
        assert_eq!(
            states,
            vec![
                ([0u32.to_le_bytes(), 1u32.to_le_bytes()].concat(), 1),
                ([1u32.to_le_bytes(), 1u32.to_le_bytes()].concat(), 1),
            ]
        );
        // Afterwards everything passes through.
        assert!(matches!(e.filter(&enable(0, 0, 1)).unwrap(), Early::Forward(v) if v.is_empty()));
        // Without PROTOCOL_FEATURES nothing is replayed.
        let mut e = EarlyEnables::default();
        assert!(matches!(
            e.filter(&enable(0, 1, 1)).unwrap(),
            Early::Hold(None)
        ));
        let set = Message::test(
            FrontendReq::SET_FEATURES,
            (1u64 << 32).to_le_bytes().to_vec(),
            vec![],
        );
        assert!(matches!(e.filter(&set).unwrap(), Early::Forward(v) if v.is_empty()));
        // A ring no device has: refused, so the held list stays bounded.
        let mut e = EarlyEnables::default();
        for ring in 0..MAX_RINGS {
            assert!(matches!(
                e.filter(&enable(ring, 1, 1)).unwrap(),
                Early::Hold(None)
            ));
        }
        assert!(matches!(
            e.filter(&enable(MAX_RINGS, 1, 1)),
            Err(GuardError::EarlyRing(r)) if r == MAX_RINGS
        ));
        assert_eq!(e.held.len(), MAX_RINGS as usize);
    }
}
