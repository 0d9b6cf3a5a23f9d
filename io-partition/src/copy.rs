//! Copies into and between guests' descriptor chains: a cursor that
//! writes sequentially into a chain's device-writable segments, from host
//! bytes or straight from another guest's memory (the one copy of the net
//! switch and the vsock relay), and the segment arithmetic that skips a
//! header.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::Segment;

/// Writes sequentially into the device-writable segments of a chain.
pub(crate) struct Cursor<'a> {
    mem: &'a GuestMemoryMmap<()>,
    segs: &'a [Segment],
    seg: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap<()>, segs: &'a [Segment]) -> Self {
        Cursor {
            mem,
            segs,
            seg: 0,
            off: 0,
        }
    }

    /// The next writable range, skipping exhausted and empty segments.
    fn room(&mut self) -> Result<(GuestAddress, usize), ()> {
        loop {
            let s = self.segs.get(self.seg).ok_or(())?;
            let left = s.len as usize - self.off;
            if left > 0 {
                return Ok((s.addr.checked_add(self.off as u64).ok_or(())?, left));
            }
            self.seg += 1;
            self.off = 0;
        }
    }

    /// Appends `bytes`.
    pub(crate) fn put(&mut self, mut bytes: &[u8]) -> Result<(), ()> {
        while !bytes.is_empty() {
            let (addr, room) = self.room()?;
            let n = room.min(bytes.len());
            self.mem.write_slice(&bytes[..n], addr).map_err(|_| ())?;
            bytes = &bytes[n..];
            self.off += n;
        }
        Ok(())
    }

    /// Appends the bytes of `src_segs` in `src_mem` (another guest's
    /// memory), copying them once, memory to memory.
    pub(crate) fn put_guest(
        &mut self,
        src_mem: &GuestMemoryMmap<()>,
        src_segs: &[Segment],
    ) -> Result<(), ()> {
        for s in src_segs.iter().filter(|s| s.len > 0) {
            for slice in src_mem.get_slices(s.addr, s.len as usize) {
                let mut slice = slice.map_err(|_| ())?;
                while !slice.is_empty() {
                    let (addr, room) = self.room()?;
                    let n = room.min(slice.len());
                    let (mut head, rest) = slice.split_at(n).map_err(|_| ())?;
                    for dst in self.mem.get_slices(addr, n) {
                        let dst = dst.map_err(|_| ())?;
                        let (chunk, more) = head.split_at(dst.len()).map_err(|_| ())?;
                        chunk.copy_to_volatile_slice(dst);
                        head = more;
                    }
                    self.off += n;
                    slice = rest;
                }
            }
        }
        Ok(())
    }
}

/// Appends the segments of `segs` that cover bytes `skip..skip + len` (or
/// fewer, if `segs` ends first).
pub(crate) fn push_range(segs: &[Segment], skip: usize, len: usize, out: &mut Vec<Segment>) {
    let start = out.len();
    push_tail(segs, skip, out);
    let mut left = len;
    let mut keep = start;
    for s in &mut out[start..] {
        if left == 0 {
            break;
        }
        let n = (s.len as usize).min(left);
        s.len = n as u32;
        left -= n;
        keep += 1;
    }
    out.truncate(keep);
}

/// Appends the segments of `segs` that lie after its first `skip` bytes.
pub(crate) fn push_tail(segs: &[Segment], mut skip: usize, out: &mut Vec<Segment>) {
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            // In guest memory for `len` bytes (checked by the walker).
            addr: GuestAddress(s.addr.0 + skip as u64),
            len: (len - skip) as u32,
            write: s.write,
        });
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::gather;

    #[test]
    fn cursor_and_gather_cross_segment_boundaries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let w = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: true,
        };
        let segs = [w(0x1000, 5), w(0x2000, 0), w(0x3000, 20)];
        let data: Vec<u8> = (1..=16).collect();
        let mut c = Cursor::new(&mem, &segs);
        c.put(&[0xaa; 3]).unwrap();
        c.put(&data).unwrap();
        let mut out = vec![0u8; 16];
        gather(&mem, &segs, 3, &mut out).unwrap();
        assert_eq!(out, data);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0xaa, 0xaa, 0xaa, 1, 2]);
        // Not enough room left (25 bytes in all, 19 used).
        assert!(c.put(&[0u8; 7]).is_err());
        let mut big = vec![0u8; 26];
        assert!(gather(&mem, &segs, 0, &mut big).is_err());
    }

    #[test]
    fn guest_to_guest_copy_follows_both_segment_lists() {
        // Two "guests", the source spanning two memory regions.
        let src = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        src.write_slice(&data[..200], GuestAddress(0xf80)).unwrap();
        src.write_slice(&data[200..], GuestAddress(0x1800)).unwrap();
        let r = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: false,
        };
        // 0xf80..0x1048 crosses the region boundary at 0x1000.
        let src_segs = [r(0xf80, 200), r(0x1800, 0), r(0x1800, 100)];
        let dst_segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 13,
                write: true,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 400,
                write: true,
            },
        ];
        let mut c = Cursor::new(&dst, &dst_segs);
        c.put(&[9u8; 3]).unwrap();
        c.put_guest(&src, &src_segs).unwrap();
        let mut out = vec![0u8; 303];
        gather(&dst, &dst_segs, 0, &mut out).unwrap();
        assert_eq!(out[..3], [9, 9, 9]);
        assert_eq!(out[3..], data[..]);
        // More than the destination holds.
        let mut c = Cursor::new(&dst, &dst_segs[..1]);
        assert!(c.put_guest(&src, &src_segs).is_err());
    }

    #[test]
    fn push_range_takes_exactly_the_bytes_asked_for() {
        let r = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: false,
        };
        let segs = [r(0x100, 44), r(0x200, 10), r(0x300, 50)];
        let mut out = vec![r(0x9000, 1)];
        push_range(&segs, 44, 15, &mut out);
        assert_eq!(out, vec![r(0x9000, 1), r(0x200, 10), r(0x300, 5)]);
        out.clear();
        push_range(&segs, 50, 1000, &mut out);
        assert_eq!(out, vec![r(0x206, 4), r(0x300, 50)]);
        out.clear();
        push_range(&segs, 10, 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn push_tail_skips_the_headers_across_segments() {
        let r = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
            write: false,
        };
        let mut out = Vec::new();
        push_tail(&[r(0x100, 12), r(0x200, 10), r(0x300, 50)], 26, &mut out);
        assert_eq!(out, vec![r(0x304, 46)]);
        out.clear();
        push_tail(&[r(0x100, 40)], 26, &mut out);
        assert_eq!(out, vec![r(0x11a, 14)]);
    }
}
