//! The host's end of the guest's `vsock=` words over a Unix stream (a
//! hybrid vsock socket of part-io or of another backend): the same test
//! stream ([`vsock_pattern`]) and the same FNV-1a 64 `sum=` the guest
//! prints, so a test can check both directions byte for byte.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::words::vsock_pattern;

/// FNV-1a 64 over a stream, as the guest prints it after `sum=`.
#[derive(Clone, Copy, Debug)]
pub struct StreamSum(u64);

impl Default for StreamSum {
    fn default() -> Self {
        StreamSum(0xcbf2_9ce4_8422_2325)
    }
}

impl StreamSum {
    pub fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// As the guest prints it (16 hex digits).
    pub fn text(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// What one side of [`exchange`] moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchanged {
    /// Sum of the bytes written to the guest.
    pub sent: String,
    /// Sum of the bytes read from the guest.
    pub received: String,
    /// Bytes read from the guest (each checked against the pattern).
    pub received_bytes: u64,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("byte {at} from the guest is {got:#04x}, the pattern has {want:#04x}")]
    Pattern { at: u64, got: u8, want: u8 },
    #[error("reading from the guest: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing to the guest: {0}")]
    Write(#[source] std::io::Error),
    #[error("the writer thread panicked")]
    Writer,
}

/// Writes `send` bytes of the pattern while reading (and checking against
/// the pattern) the `recv` bytes the guest sends; then shuts the write half
/// (the guest hears a shutdown) and reads to the end of the stream, which
/// must bring nothing more. Each read is bounded by `timeout`.
///
/// The write half stays open until everything expected has arrived: a
/// backend may take a host's half-close for a full close (vhost-device-vsock
/// 0.3 does, and drops what it still held for the host).
pub fn exchange(
    stream: UnixStream,
    send: u64,
    recv: u64,
    timeout: Duration,
) -> Result<Exchanged, ExchangeError> {
    let mut out = stream.try_clone().map_err(ExchangeError::Write)?;
    let writer = std::thread::spawn(move || -> Result<(String, UnixStream), ExchangeError> {
        let mut sum = StreamSum::default();
        let mut at = 0u64;
        while at < send {
            let chunk: Vec<u8> = (at..send.min(at + 65536)).map(vsock_pattern).collect();
            sum.add(&chunk);
            out.write_all(&chunk).map_err(ExchangeError::Write)?;
            at += chunk.len() as u64;
        }
        Ok((sum.text(), out))
    });
    let mut input = stream;
    input
        .set_read_timeout(Some(timeout))
        .map_err(ExchangeError::Read)?;
    let mut sum = StreamSum::default();
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut read = |got: &mut u64, limit: u64| -> Result<usize, ExchangeError> {
        let want = buf
            .len()
            .min(usize::try_from(limit - *got).unwrap_or(usize::MAX))
            .max(1);
        let k = input.read(&mut buf[..want]).map_err(ExchangeError::Read)?;
        if let Some((i, b)) = buf[..k]
            .iter()
            .enumerate()
            .find(|(i, b)| **b != vsock_pattern(*got + *i as u64))
        {
            let at = *got + i as u64;
            return Err(ExchangeError::Pattern {
                at,
                got: *b,
                want: vsock_pattern(at),
            });
        }
        sum.add(&buf[..k]);
        *got += k as u64;
        Ok(k)
    };
    let mut result = Ok(());
    while got < recv {
        match read(&mut got, recv) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let written = writer.join().map_err(|_| ExchangeError::Writer)?;
    result?;
    let (sent, out) = written?;
    out.shutdown(Shutdown::Write)
        .map_err(ExchangeError::Write)?;
    while read(&mut got, u64::MAX)? > 0 {}
    Ok(Exchanged {
        sent,
        received: sum.text(),
        received_bytes: got,
    })
}

/// Opens a connection to guest port `port` through the hybrid socket
/// `socket` (`CONNECT <port>\n`); the stream and the port named in the
/// `OK <port>` answer.
pub fn connect(socket: &std::path::Path, port: u32) -> std::io::Result<(UnixStream, u32)> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let bad = || std::io::Error::other(format!("answer to CONNECT {port}: {text:?}"));
    let answered = text
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(bad)?;
    Ok((s, answered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_is_the_guests_fnv1a() {
        let mut s = StreamSum::default();
        s.add(b"a");
        s.add(b"bc");
        assert_eq!(s.text(), format!("{:016x}", crate::fnv1a64(b"abc")));
    }

    #[test]
    fn an_exchange_checks_every_byte_and_both_sums() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let n = 200_000u64;
        let peer = std::thread::spawn(move || {
            let stream: Vec<u8> = (0..n).map(vsock_pattern).collect();
            b.write_all(&stream).unwrap();
            b.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            (crate::fnv1a64(&stream), got)
        });
        let done = exchange(a, 1000, n, Duration::from_secs(10)).unwrap();
        let (peer_sent, peer_got) = peer.join().unwrap();
        assert_eq!(done.received_bytes, n);
        assert_eq!(done.received, format!("{peer_sent:016x}"));
        assert_eq!(peer_got, (0..1000).map(vsock_pattern).collect::<Vec<_>>());
        assert_eq!(done.sent, format!("{:016x}", crate::fnv1a64(&peer_got)));

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[vsock_pattern(0), vsock_pattern(1) ^ 1])
            .unwrap();
        drop(b);
        match exchange(a, 0, 2, Duration::from_secs(10)) {
            Err(ExchangeError::Pattern { at: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
