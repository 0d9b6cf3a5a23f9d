//! Parser for the guest's serial report (format in README.md).

/// One `memmap:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemmapEntry {
    /// E820-style type (1 = RAM).
    pub kind: u32,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// `initrd:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initrd {
    /// `initrd: none`
    None,
    /// `initrd: <size> bytes fnv1a64=<hash>`
    Present {
        /// Module size in bytes.
        size: u64,
        /// FNV-1a 64 of the module.
        fnv1a64: u64,
    },
}

/// One `probe:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `probe: read 0x<addr> = 0x<value>`
    Read {
        /// Guest-physical address.
        addr: u64,
        /// Value read.
        value: u32,
    },
    /// `probe: write 0x<addr>`
    Write {
        /// Guest-physical address.
        addr: u64,
    },
}

/// One `blk: bench <kind> <ops> ops in <us> us` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkBench {
    /// `randread`, `randwrite` or `seqread`.
    pub kind: String,
    /// Requests completed.
    pub ops: u64,
    /// Wall time in microseconds (LAPIC timer).
    pub us: u64,
}

impl BlkBench {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 * 1e6 / self.us.max(1) as f64
    }

    /// Megabytes (10^6 bytes) per second for `bytes_per_op`-sized requests
    /// (4096 for randread/randwrite, 65536 for seqread).
    pub fn mb_per_s(&self, bytes_per_op: u64) -> f64 {
        (self.ops * bytes_per_op) as f64 / self.us.max(1) as f64
    }
}

/// `net: ready mac=<mac> queue=<n> features=0x<f>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetReady {
    /// The device's MAC.
    pub mac: [u8; 6],
    /// Receive queue size.
    pub queue: u32,
    /// Negotiated feature bits.
    pub features: u64,
}

/// `net: send <N> frames <SIZE> bytes in <us> us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSend {
    /// Data frames sent and acknowledged.
    pub frames: u64,
    /// Bytes per frame (Ethernet header included, no FCS).
    pub size: u64,
    /// From the peer's first ack to its last, microseconds (LAPIC timer).
    pub us: u64,
}

impl NetSend {
    /// Frames per second.
    pub fn frames_per_s(&self) -> f64 {
        self.frames as f64 * 1e6 / self.us.max(1) as f64
    }

    /// Megabytes (10^6 bytes) of frames per second.
    pub fn mb_per_s(&self) -> f64 {
        (self.frames * self.size) as f64 / self.us.max(1) as f64
    }
}

/// `net: received <ok> frames ok lost=<l> bad=<b> dup=<d>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetReceived {
    /// Intact frames in sequence.
    pub ok: u64,
    /// Sequence numbers skipped.
    pub lost: u64,
    /// Damaged frames.
    pub bad: u64,
    /// Repeated frames.
    pub dup: u64,
}

/// `net: rtt <N> round trips in <us> us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetRtt {
    /// Round trips.
    pub rounds: u64,
    /// Total microseconds.
    pub us: u64,
}

impl NetRtt {
    /// Mean round-trip time in microseconds.
    pub fn mean_us(&self) -> f64 {
        self.us as f64 / self.rounds.max(1) as f64
    }
}

/// `net: frame src=<mac> dst=<mac> type=0x<t> len=<n>[ pvnf=<kind>:<seq>:<ok|bad>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetFrameLine {
    /// Source MAC.
    pub src: [u8; 6],
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Ethertype.
    pub ethertype: u16,
    /// Frame length.
    pub len: usize,
    /// For frames of the test format: kind name, sequence number, intact.
    pub pvnf: Option<(String, u64, bool)>,
}

fn net_frame_line(v: &str) -> Option<NetFrameLine> {
    let mut f = NetFrameLine {
        src: [0; 6],
        dst: [0; 6],
        ethertype: 0,
        len: 0,
        pvnf: None,
    };
    let mut seen = 0;
    for field in v.split(' ') {
        let (k, val) = field.split_once('=')?;
        match k {
            "src" => f.src = crate::net_frame::parse_mac(val)?,
            "dst" => f.dst = crate::net_frame::parse_mac(val)?,
            "type" => f.ethertype = u16::try_from(hex(val)?).ok()?,
            "len" => f.len = val.parse().ok()?,
            "pvnf" => {
                let mut p = val.split(':');
                let (kind, seq, ok) = (p.next()?, p.next()?.parse().ok()?, p.next()?);
                f.pvnf = Some((kind.to_string(), seq, ok == "ok"));
                continue;
            }
            _ => return None,
        }
        seen += 1;
    }
    (seen == 4).then_some(f)
}

fn key_values<'a>(v: &'a str, keys: &[&str]) -> Option<Vec<&'a str>> {
    let fields: Vec<&str> = v.split(' ').collect();
    if fields.len() != keys.len() {
        return None;
    }
    keys.iter()
        .zip(fields)
        .map(|(k, f)| f.strip_prefix(k)?.strip_prefix('='))
        .collect()
}

/// A parsed report. Fields stay empty/`None` when their line is absent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether the `partvisor-testguest 1` header was seen.
    pub header: bool,
    /// The `cmdline:` value.
    pub cmdline: Option<String>,
    /// `memmap:` lines in order.
    pub memmap: Vec<MemmapEntry>,
    /// `ram: <n> KiB`.
    pub ram_kib: Option<u64>,
    /// `cpus: <n> (madt)`.
    pub cpus: Option<u32>,
    /// APIC ids from `cpu <id>: online`, in order.
    pub online: Vec<u32>,
    /// The `initrd:` line.
    pub initrd: Option<Initrd>,
    /// `probe:` lines in order.
    pub probes: Vec<Probe>,
    /// Words from `warn: unknown word <w>`.
    pub unknown_words: Vec<String>,
    /// `echo: 0x<hh>` bytes.
    pub echoed: Vec<u8>,
    /// `blk: bench` lines in order.
    pub blk_benches: Vec<BlkBench>,
    /// `net: ready` lines in order.
    pub net_ready: Vec<NetReady>,
    /// `net: send ... in <us> us` lines in order.
    pub net_sends: Vec<NetSend>,
    /// `net: received <ok> frames ok ...` lines in order (`net=recv`).
    pub net_received: Vec<NetReceived>,
    /// `net: window max_ahead=<k>` values in order.
    pub net_max_ahead: Vec<u64>,
    /// `net: rtt` lines in order.
    pub net_rtts: Vec<NetRtt>,
    /// `net: received <k> frames` counts in order (`expect-none`, `recv-any`).
    pub net_counts: Vec<u64>,
    /// `net: frame` lines in order.
    pub net_frames: Vec<NetFrameLine>,
    /// `exit: <code>`.
    pub exit: Option<u32>,
    /// Every line, for anything else.
    pub lines: Vec<String>,
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().strip_prefix("0x")?, 16).ok()
}

impl Report {
    /// Parse serial output (tolerates noise lines and `\r`).
    pub fn parse(serial: &str) -> Report {
        let mut r = Report::default();
        for raw in serial.lines() {
            let line = raw.trim_end_matches('\r');
            r.lines.push(line.to_string());
            if line == crate::REPORT_HEADER {
                r.header = true;
            } else if let Some(v) = line.strip_prefix("cmdline:") {
                r.cmdline = Some(v.strip_prefix(' ').unwrap_or(v).to_string());
            } else if let Some(v) = line.strip_prefix("memmap: ") {
                let f: Vec<&str> = v.split_whitespace().collect();
                if let [kind, start, end] = f[..] {
                    if let (Ok(kind), Some(start), Some(end)) = (kind.parse(), hex(start), hex(end))
                    {
                        r.memmap.push(MemmapEntry { kind, start, end });
                    }
                }
            } else if let Some(v) = line.strip_prefix("ram: ") {
                r.ram_kib = v.strip_suffix(" KiB").and_then(|n| n.parse().ok());
            } else if let Some(v) = line.strip_prefix("cpus: ") {
                r.cpus = v.strip_suffix(" (madt)").and_then(|n| n.parse().ok());
            } else if let Some(v) = line.strip_prefix("cpu ") {
                if let Some(id) = v.strip_suffix(": online").and_then(|n| n.parse().ok()) {
                    r.online.push(id);
                }
            } else if let Some(v) = line.strip_prefix("initrd: ") {
                r.initrd = if v == "none" {
                    Some(Initrd::None)
                } else {
                    let (size, hash) = v.split_once(" bytes fnv1a64=").unwrap_or(("", ""));
                    match (size.parse(), u64::from_str_radix(hash, 16)) {
                        (Ok(size), Ok(fnv1a64)) => Some(Initrd::Present { size, fnv1a64 }),
                        _ => None,
                    }
                };
            } else if let Some(v) = line.strip_prefix("probe: read ") {
                if let Some((a, val)) = v.split_once(" = ") {
                    if let (Some(addr), Some(value)) = (hex(a), hex(val)) {
                        r.probes.push(Probe::Read {
                            addr,
                            value: value as u32,
                        });
                    }
                }
            } else if let Some(v) = line.strip_prefix("probe: write ") {
                if let Some(addr) = hex(v) {
                    r.probes.push(Probe::Write { addr });
                }
            } else if let Some(v) = line.strip_prefix("warn: unknown word ") {
                r.unknown_words.push(v.to_string());
            } else if let Some(v) = line.strip_prefix("echo: 0x") {
                if let Ok(b) = u8::from_str_radix(v, 16) {
                    r.echoed.push(b);
                }
            } else if let Some(v) = line.strip_prefix("blk: bench ") {
                let f: Vec<&str> = v.split(' ').collect();
                if let [kind, ops, "ops", "in", us, "us"] = f[..] {
                    if let (Ok(ops), Ok(us)) = (ops.parse(), us.parse()) {
                        r.blk_benches.push(BlkBench {
                            kind: kind.to_string(),
                            ops,
                            us,
                        });
                    }
                }
            } else if let Some(v) = line.strip_prefix("net: ") {
                r.parse_net(v);
            } else if let Some(v) = line.strip_prefix("exit: ") {
                r.exit = v.parse().ok();
            }
        }
        r
    }

    fn parse_net(&mut self, v: &str) {
        let num = |s: &str| s.parse::<u64>().ok();
        if let Some(v) = v.strip_prefix("ready ") {
            if let Some([mac, queue, features]) =
                key_values(v, &["mac", "queue", "features"]).as_deref()
            {
                if let (Some(mac), Ok(queue), Some(features)) = (
                    crate::net_frame::parse_mac(mac),
                    queue.parse(),
                    hex(features),
                ) {
                    self.net_ready.push(NetReady {
                        mac,
                        queue,
                        features,
                    });
                }
            }
        } else if let Some(v) = v.strip_prefix("send ") {
            let f: Vec<&str> = v.split(' ').collect();
            if let [n, "frames", size, "bytes", "in", us, "us"] = f[..] {
                if let (Some(frames), Some(size), Some(us)) = (num(n), num(size), num(us)) {
                    self.net_sends.push(NetSend { frames, size, us });
                }
            }
        } else if let Some(v) = v.strip_prefix("rtt ") {
            let f: Vec<&str> = v.split(' ').collect();
            if let [n, "round", "trips", "in", us, "us"] = f[..] {
                if let (Some(rounds), Some(us)) = (num(n), num(us)) {
                    self.net_rtts.push(NetRtt { rounds, us });
                }
            }
        } else if let Some(v) = v.strip_prefix("received ") {
            if let Some((n, rest)) = v.split_once(" frames ok ") {
                if let Some([lost, bad, dup]) = key_values(rest, &["lost", "bad", "dup"]).as_deref()
                {
                    if let (Some(ok), Some(lost), Some(bad), Some(dup)) =
                        (num(n), num(lost), num(bad), num(dup))
                    {
                        self.net_received.push(NetReceived { ok, lost, bad, dup });
                    }
                }
            } else if let Some(n) = v.strip_suffix(" frames").and_then(num) {
                self.net_counts.push(n);
            }
        } else if let Some(v) = v.strip_prefix("window max_ahead=") {
            self.net_max_ahead.extend(num(v));
        } else if let Some(v) = v.strip_prefix("frame ") {
            self.net_frames.extend(net_frame_line(v));
        }
    }

    /// Sum of the type-1 (RAM) entries, in bytes.
    pub fn ram_bytes_from_memmap(&self) -> u64 {
        self.memmap
            .iter()
            .filter(|e| e.kind == 1)
            .map(|e| e.end - e.start)
            .sum()
    }

    /// End of the highest RAM entry.
    pub fn ram_end(&self) -> Option<u64> {
        self.memmap
            .iter()
            .filter(|e| e.kind == 1)
            .map(|e| e.end)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_report_line_kind() {
        let text = "noise\r\npartvisor-testguest 1\ncmdline: a exit=7\n\
            memmap: 1 0x0000000000000000 0x00000000000a0000\n\
            memmap: 1 0x0000000000100000 0x0000000001800000\n\
            ram: 24192 KiB\ncpus: 2 (madt)\ncpu 0: online\ncpu 1: online\n\
            initrd: 5 bytes fnv1a64=00000000000000ff\nwarn: unknown word a\n\
            probe: read 0x0000000001900000 = 0xffffffff\nprobe: write 0x0000000001900000\n\
            echo: 0x61\nexit: 7\n";
        let r = Report::parse(text);
        assert!(r.header);
        assert_eq!(r.cmdline.as_deref(), Some("a exit=7"));
        assert_eq!(r.memmap.len(), 2);
        assert_eq!(r.ram_bytes_from_memmap(), 0xa0000 + 0x1700000);
        assert_eq!(r.ram_end(), Some(0x1800000));
        assert_eq!(r.ram_kib, Some(24192));
        assert_eq!(r.cpus, Some(2));
        assert_eq!(r.online, vec![0, 1]);
        assert_eq!(
            r.initrd,
            Some(Initrd::Present {
                size: 5,
                fnv1a64: 0xff
            })
        );
        assert_eq!(r.unknown_words, vec!["a".to_string()]);
        assert_eq!(
            r.probes,
            vec![
                Probe::Read {
                    addr: 0x1900000,
                    value: 0xffff_ffff
                },
                Probe::Write { addr: 0x1900000 }
            ]
        );
        assert_eq!(r.echoed, vec![0x61]);
        assert_eq!(r.exit, Some(7));
    }

    #[test]
    fn blk_bench_lines_parse_into_rates() {
        let r = Report::parse(
            "blk: bench randread 20000 ops in 500000 us\n\
             blk: bench seqread 2000 ops in 40000 us\n\
             blk: bench randread failed (ioerr)\n",
        );
        assert_eq!(
            r.blk_benches,
            vec![
                BlkBench {
                    kind: "randread".into(),
                    ops: 20000,
                    us: 500_000
                },
                BlkBench {
                    kind: "seqread".into(),
                    ops: 2000,
                    us: 40_000
                }
            ]
        );
        assert_eq!(r.blk_benches[0].iops(), 40_000.0);
        assert_eq!(r.blk_benches[1].mb_per_s(65536), 3276.8);
    }

    #[test]
    fn net_lines_parse_into_values() {
        let r = Report::parse(
            "net: ready mac=52:54:00:00:00:0a queue=256 features=0x0000000120000020\n\
             net: send 10000 frames 1514 bytes in 500000 us\n\
             net: received 9998 frames ok lost=1 bad=1 dup=0\n\
             net: window max_ahead=31\n\
             net: rtt 1000 round trips in 250000 us\n\
             net: frame src=02:de:ad:be:ef:01 dst=ff:ff:ff:ff:ff:ff type=0x88b5 len=100 pvnf=spoof:3:ok\n\
             net: frame src=52:54:00:00:00:0b dst=33:33:00:00:00:16 type=0x86dd len=90\n\
             net: received 2 frames\n\
             net: timeout: received 3 of 9 data frames\n",
        );
        assert_eq!(
            r.net_ready,
            vec![NetReady {
                mac: [0x52, 0x54, 0, 0, 0, 0x0a],
                queue: 256,
                features: 0x1_2000_0020
            }]
        );
        let send = r.net_sends[0];
        assert_eq!((send.frames, send.size, send.us), (10000, 1514, 500_000));
        assert_eq!(send.frames_per_s(), 20_000.0);
        assert_eq!(send.mb_per_s(), 30.28);
        assert_eq!(
            r.net_received,
            vec![NetReceived {
                ok: 9998,
                lost: 1,
                bad: 1,
                dup: 0
            }]
        );
        assert_eq!(r.net_max_ahead, vec![31]);
        assert_eq!(r.net_rtts[0].mean_us(), 250.0);
        assert_eq!(r.net_counts, vec![2], "the timeout line is not a count");
        assert_eq!(r.net_frames.len(), 2);
        assert_eq!(r.net_frames[0].src, crate::net_frame::SPOOF_SOURCE);
        assert_eq!(r.net_frames[0].pvnf, Some(("spoof".into(), 3, true)));
        assert_eq!(
            (
                r.net_frames[1].ethertype,
                r.net_frames[1].len,
                &r.net_frames[1].pvnf
            ),
            (0x86dd, 90, &None)
        );
    }

    #[test]
    fn empty_cmdline_parses_as_empty_string() {
        assert_eq!(Report::parse("cmdline: \n").cmdline.as_deref(), Some(""));
        assert_eq!(Report::parse("cmdline:\n").cmdline.as_deref(), Some(""));
    }
}
