//! Messages out of a byte stream: the TCP transport's receive side, apart
//! from the socket so that it can be driven (and fuzzed) with any bytes.
//!
//! A message is the 64-byte header ([`crate::wire`]) followed, for SEND,
//! WRITE and READ responses with data, by exactly `len` payload bytes. The
//! deframer validates the header's kind and the announced length
//! ([`MAX_MESSAGE`]) before it allocates the payload, and hands out one
//! event per complete message; a peer that breaks the framing ends the
//! stream with [`LinkEvent::Lost`].

use std::io;

use crate::link::{InData, LinkEvent};
use crate::types::MAX_MESSAGE;
use crate::wire::{Kind, Msg, MSG_LEN};

/// Staging buffer for socket reads.
pub(crate) const RBUF: usize = 256 << 10;

pub(crate) struct Deframer {
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// A message whose payload is still arriving: (header, payload, filled).
    partial: Option<(Msg, Vec<u8>, usize)>,
}

impl Deframer {
    pub fn new() -> Self {
        Deframer {
            rbuf: vec![0u8; RBUF],
            rstart: 0,
            rend: 0,
            partial: None,
        }
    }

    /// Parses one complete message out of what has been read, if any.
    pub fn parse_one(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some((m, mut v, filled)) = self.partial.take() {
                let take = (v.len() - filled).min(self.rend - self.rstart);
                v[filled..filled + take]
                    .copy_from_slice(&self.rbuf[self.rstart..self.rstart + take]);
                self.rstart += take;
                if filled + take == v.len() {
                    return Some(LinkEvent::Msg(m, InData::Bytes(v)));
                }
                self.partial = Some((m, v, filled + take));
                return None;
            }
            if self.rend - self.rstart < MSG_LEN {
                return None;
            }
            let hdr = &self.rbuf[self.rstart..self.rstart + MSG_LEN];
            self.rstart += MSG_LEN;
            let Some(m) = Msg::decode(hdr) else {
                return Some(LinkEvent::Lost("peer sent an undecodable message".into()));
            };
            if m.kind == Kind::Close {
                return Some(LinkEvent::Closed);
            }
            if !m.carries_payload() {
                return Some(LinkEvent::Msg(m, InData::None));
            }
            if m.len > MAX_MESSAGE {
                return Some(LinkEvent::Lost(
                    "peer announced an oversized payload".into(),
                ));
            }
            self.partial = Some((m, vec![0u8; m.len as usize], 0));
        }
    }

    /// Reads once with `read` (which fills the slice it is given, as
    /// `Read::read` does): a big payload still arriving goes straight into
    /// its buffer, anything else into the staging buffer. Returns what
    /// `read` returned; 0 means the stream ended.
    pub fn fill(&mut self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<usize> {
        if let Some((_, v, filled)) = &mut self.partial {
            if self.rstart == self.rend && v.len() - *filled >= RBUF / 2 {
                let n = read(&mut v[*filled..])?;
                *filled += n.min(v.len() - *filled);
                return Ok(n);
            }
        }
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let end = self.rend;
        let n = read(&mut self.rbuf[end..])?;
        self.rend += n.min(RBUF - end);
        Ok(n)
    }
}

/// Drives a deframer with `data` cut into reads of the sizes `cuts` gives
/// (as a socket might deliver it), collecting events until the stream ends
/// or breaks; checks the framing's promises on the way.
#[cfg(any(test, feature = "fuzzing"))]
pub fn drive(data: &[u8], cuts: &[u8]) -> usize {
    let mut d = Deframer::new();
    let mut at = 0;
    let mut events = 0;
    let mut cut = cuts.iter().cycle();
    loop {
        while let Some(ev) = d.parse_one() {
            events += 1;
            match ev {
                LinkEvent::Msg(m, InData::Bytes(v)) => {
                    assert!(m.carries_payload() && v.len() as u64 == m.len);
                }
                LinkEvent::Msg(m, _) => assert!(!m.carries_payload()),
                LinkEvent::Closed | LinkEvent::Lost(_) => return events,
            }
        }
        if at == data.len() {
            return events;
        }
        let step = usize::from(*cut.next().unwrap_or(&255)).max(1) * 64;
        let r = d.fill(|buf| {
            let n = step.min(buf.len()).min(data.len() - at);
            buf[..n].copy_from_slice(&data[at..at + n]);
            Ok(n)
        });
        match r {
            Ok(0) | Err(_) => return events,
            Ok(n) => at += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_split_anywhere_arrives_whole_and_close_ends_the_stream() {
        let mut w = Msg::new(Kind::Write, 1);
        w.len = 100;
        let mut data = w.encode().to_vec();
        data.extend(std::iter::repeat_n(7u8, 100));
        data.extend_from_slice(&Msg::new(Kind::ReadDone, 2).encode());
        data.extend_from_slice(&Msg::new(Kind::Close, 3).encode());
        data.extend_from_slice(&Msg::new(Kind::ReadDone, 4).encode());
        for cut in [1u8, 2, 3, 255] {
            // write, read-done, close: the message after close is not read.
            assert_eq!(drive(&data, &[cut]), 3, "cut {cut}");
        }
    }

    #[test]
    fn an_oversized_or_unknown_header_loses_the_stream() {
        let mut w = Msg::new(Kind::Send, 1);
        w.len = MAX_MESSAGE + 1;
        let mut d = Deframer::new();
        let enc = w.encode();
        d.fill(|b| {
            b[..MSG_LEN].copy_from_slice(&enc);
            Ok(MSG_LEN)
        })
        .unwrap();
        assert!(matches!(d.parse_one(), Some(LinkEvent::Lost(m)) if m.contains("oversized")));
        let mut bad = Msg::new(Kind::Send, 1).encode();
        bad[0] = 99;
        let mut d = Deframer::new();
        d.fill(|b| {
            b[..MSG_LEN].copy_from_slice(&bad);
            Ok(MSG_LEN)
        })
        .unwrap();
        assert!(matches!(d.parse_one(), Some(LinkEvent::Lost(m)) if m.contains("undecodable")));
    }
}
