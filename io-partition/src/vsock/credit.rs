//! Credit accounting of one direction of a relayed connection.
//!
//! virtio-vsock flow control (virtio 1.2 section 5.10.6.3): each receiver
//! advertises `buf_alloc` (its buffer for the connection) and `fwd_cnt`
//! (bytes it has consumed so far, wrapping at 2^32); a sender may have at most
//! `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. part-io is not an end of
//! the connection but sits between the two guests, so it keeps the same
//! books for each direction and holds both guests to them:
//!
//! - a sender that sends past the receiver's advertised space (a credit
//!   liar) is refused: its packet is not delivered, the connection is reset,
//!   and the kind is counted;
//! - a receiver that claims to have consumed more than it was given (which
//!   would raise the sender's credit past what it can hold) is refused the
//!   same way;
//! - the `buf_alloc` a receiver advertises is capped at [`MAX_BUF_ALLOC`]
//!   before the sender sees it, which bounds what part-io may ever have to
//!   hold for a connection.

/// The largest receive buffer part-io passes on for one connection (Linux's
/// default `buffer_size` is 256 KiB, its maximum 256 KiB unless raised).
pub const MAX_BUF_ALLOC: u32 = 256 * 1024;

/// A broken credit rule, named for the side that broke it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    /// The sender sent more than the receiver had room for.
    #[error("sent {len} bytes with only {free} bytes of credit")]
    Exceeded { len: u32, free: u32 },
    /// The receiver's `fwd_cnt` advanced past what it was given.
    #[error("fwd_cnt advanced by {advance} with only {in_flight} bytes in flight")]
    FwdAhead { advance: u32, in_flight: u32 },
}

/// The books of one direction (sender -> receiver).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// Payload bytes relayed to the receiver so far (wrapping).
    relayed: u32,
    /// The receiver's advertised buffer, capped at [`MAX_BUF_ALLOC`].
    buf_alloc: u32,
    /// The receiver's last `fwd_cnt`.
    fwd_cnt: u32,
}

impl Credit {
    /// Bytes relayed and not yet consumed by the receiver.
    pub fn in_flight(&self) -> u32 {
        self.relayed.wrapping_sub(self.fwd_cnt)
    }

    /// The receiver's last `fwd_cnt`.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// Bytes the sender may still send.
    pub fn free(&self) -> u32 {
        self.buf_alloc.saturating_sub(self.in_flight())
    }

    /// Accounts a `len`-byte payload from the sender, or refuses it whole.
    pub fn send(&mut self, len: u32) -> Result<(), CreditError> {
        let free = self.free();
        if len > free {
            return Err(CreditError::Exceeded { len, free });
        }
        self.relayed = self.relayed.wrapping_add(len);
        Ok(())
    }

    /// Takes the receiver's `buf_alloc` and `fwd_cnt` from a packet it sent
    /// on this connection; returns the `buf_alloc` to show the sender.
    pub fn receiver_update(&mut self, buf_alloc: u32, fwd_cnt: u32) -> Result<u32, CreditError> {
        let advance = fwd_cnt.wrapping_sub(self.fwd_cnt);
        let in_flight = self.in_flight();
        if advance > in_flight {
            return Err(CreditError::FwdAhead { advance, in_flight });
        }
        self.fwd_cnt = fwd_cnt;
        self.buf_alloc = buf_alloc.min(MAX_BUF_ALLOC);
        Ok(self.buf_alloc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_gets_exactly_the_space_the_receiver_advertised() {
        let mut c = Credit::default();
        assert_eq!(c.send(1), Err(CreditError::Exceeded { len: 1, free: 0 }));
        assert_eq!(c.receiver_update(1000, 0), Ok(1000));
        c.send(600).unwrap();
        assert_eq!(c.free(), 400);
        assert_eq!(
            c.send(401),
            Err(CreditError::Exceeded {
                len: 401,
                free: 400
            })
        );
        assert_eq!(c.free(), 400, "a refused packet is not accounted");
        c.send(400).unwrap();
        assert_eq!(c.free(), 0);
        c.receiver_update(1000, 700).unwrap();
        assert_eq!((c.in_flight(), c.free()), (300, 700));
    }

    #[test]
    fn a_receiver_cannot_claim_more_than_it_was_given() {
        let mut c = Credit::default();
        c.receiver_update(1000, 0).unwrap();
        c.send(100).unwrap();
        assert_eq!(
            c.receiver_update(1000, 101),
            Err(CreditError::FwdAhead {
                advance: 101,
                in_flight: 100
            })
        );
        c.receiver_update(1000, 100).unwrap();
        assert_eq!(c.free(), 1000);
    }

    #[test]
    fn advertised_buffers_are_capped_and_counters_wrap() {
        let mut c = Credit::default();
        assert_eq!(c.receiver_update(u32::MAX, 0), Ok(MAX_BUF_ALLOC));
        assert_eq!(c.free(), MAX_BUF_ALLOC);
        // Counters near 2^32 wrap like the guests' own.
        let mut w = Credit {
            relayed: u32::MAX - 10,
            buf_alloc: 100,
            fwd_cnt: u32::MAX - 10,
        };
        w.send(50).unwrap();
        assert_eq!(w.in_flight(), 50);
        w.receiver_update(100, (u32::MAX - 10).wrapping_add(50))
            .unwrap();
        assert_eq!(w.free(), 100);
        // A shrinking buffer leaves no credit until the receiver catches up.
        w.send(100).unwrap();
        w.receiver_update(10, w.fwd_cnt).unwrap();
        assert_eq!(w.free(), 0);
    }
}
