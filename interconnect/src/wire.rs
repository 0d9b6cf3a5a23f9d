//! The fixed 64-byte message every transport carries. Decoding validates the
//! kind; every other field is validated by the engine against local state.

pub(crate) const MSG_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Send = 1,
    Write = 2,
    Read = 3,
    Resp = 4,
    ReadDone = 5,
    Close = 6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Msg {
    pub kind: Kind,
    pub imm: Option<u32>,
    pub status: u8,
    pub seq: u64,
    pub rkey: u32,
    pub raddr: u64,
    pub len: u64,
    /// shm: id of the exposed source buffer (SEND/WRITE) — unused by tcp.
    pub src_id: u64,
    /// shm: offset in that buffer or in the read-response window.
    pub src_off: u64,
}

impl Msg {
    pub fn new(kind: Kind, seq: u64) -> Self {
        Msg {
            kind,
            imm: None,
            status: 0,
            seq,
            rkey: 0,
            raddr: 0,
            len: 0,
            src_id: 0,
            src_off: 0,
        }
    }

    /// Whether a payload of `len` bytes follows this header on a byte stream.
    pub fn carries_payload(&self) -> bool {
        matches!(self.kind, Kind::Send | Kind::Write)
            || (self.kind == Kind::Resp && self.src_id == RESP_WITH_DATA)
    }

    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0] = self.kind as u8;
        b[1] = u8::from(self.imm.is_some());
        b[2] = self.status;
        b[4..8].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b[24..32].copy_from_slice(&self.raddr.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.src_id.to_le_bytes());
        b[48..56].copy_from_slice(&self.src_off.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Msg> {
        if b.len() != MSG_LEN {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let kind = match b[0] {
            1 => Kind::Send,
            2 => Kind::Write,
            3 => Kind::Read,
            4 => Kind::Resp,
            5 => Kind::ReadDone,
            6 => Kind::Close,
            _ => return None,
        };
        Some(Msg {
            kind,
            imm: (b[1] & 1 != 0).then(|| u32_at(4)),
            status: b[2],
            seq: u64_at(8),
            rkey: u32_at(16),
            raddr: u64_at(24),
            len: u64_at(32),
            src_id: u64_at(40),
            src_off: u64_at(48),
        })
    }
}

/// `src_id` marker on a RESP that carries READ data.
pub(crate) const RESP_WITH_DATA: u64 = u64::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_and_unknown_kind_is_rejected() {
        let mut m = Msg::new(Kind::Write, 42);
        m.imm = Some(7);
        m.rkey = 0xdead_beef;
        m.raddr = 123;
        m.len = 4096;
        m.src_id = 9;
        m.src_off = 8;
        let enc = m.encode();
        assert_eq!(Msg::decode(&enc), Some(m));
        let mut bad = enc;
        bad[0] = 99;
        assert_eq!(Msg::decode(&bad), None);
        assert_eq!(Msg::decode(&enc[..10]), None);
    }
}
