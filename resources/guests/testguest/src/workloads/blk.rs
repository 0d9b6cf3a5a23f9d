//! virtio devices from `virtio_mmio.device=` words and the `blk=` actions
//! (write / verify checksummed blocks, flush, GET_ID, read-only check,
//! malformed requests, benchmarks). Report lines and exit codes are listed
//! in resources/guests/README.md.

use crate::arch::VEC_VIRTIO;
use crate::blk_pattern::{block_ok, fill_block, BLOCK_SIZE, SECTORS_PER_BLOCK};
use crate::drivers::virtio_blk::{
    completions, Blk, Completions, Done, SubmitError, WaitError, F_FLUSH, F_RO, QUEUE_DEPTH,
    S_IOERR, S_OK, S_UNSUPP, S_UNWRITTEN, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use crate::drivers::virtio_mmio::{
    Transport, DEVICE_BLOCK, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, MAGIC, VERSION_MODERN,
};
use crate::say;
use crate::smp::Watchdog;
use crate::words::{BadKind, BenchKind, BlkWord, VirtioMmioDecl};
use crate::workloads::Boot;

/// Most `virtio_mmio.device=` declarations used.
pub const MAX_DEVICES: usize = 8;

/// Exit code: a `blk=` word found no modern virtio-blk device.
pub const EXIT_NO_DEVICE: u32 = 10;
/// Exit code: the device could not be initialised.
pub const EXIT_INIT: u32 = 11;
/// Exit code: a request failed (status not OK) or did not fit the disk.
pub const EXIT_IO: u32 = 12;
/// Exit code: `blk=verify` found a block that is not what was written.
pub const EXIT_VERIFY: u32 = 13;
/// Exit code: a request did not complete in time (`blk: timeout`).
pub const EXIT_TIMEOUT: u32 = 14;
/// Exit code: `blk=expect-ro` saw the write not refused with IOERR.
pub const EXIT_NOT_REFUSED: u32 = 15;
/// Exit code: the device asked for a reset during normal I/O.
pub const EXIT_NEEDS_RESET: u32 = 16;

/// A normal request must make progress within 2–4 s.
const REQ_PERIOD_NS: u64 = 2_000_000_000;
/// A malformed request gets 1 s.
const BAD_PERIOD_NS: u64 = 1_000_000_000;

/// A request-status byte, for report lines.
struct StatusName(u8);

impl core::fmt::Display for StatusName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            S_OK => f.write_str("ok"),
            S_IOERR => f.write_str("ioerr"),
            S_UNSUPP => f.write_str("unsupp"),
            S_UNWRITTEN => f.write_str("no status"),
            s => write!(f, "status {s}"),
        }
    }
}

/// Declared devices and the live block driver.
pub struct Devices {
    decls: [Option<Transport>; MAX_DEVICES],
    /// Which declared block device `blk=` words drive (`blk=use:N`).
    selected: usize,
    blk: Option<Blk>,
}

impl Devices {
    /// No devices.
    pub fn new() -> Devices {
        Devices {
            decls: [None; MAX_DEVICES],
            selected: 0,
            blk: None,
        }
    }

    /// Record and report one `virtio_mmio.device=` declaration.
    pub fn declare(&mut self, d: VirtioMmioDecl) {
        if d.base.saturating_add(d.size) > 1 << 32 {
            say!(
                "warn: virtio 0x{:08x} is above the identity map, ignored",
                d.base
            );
            return;
        }
        let Some(free) = self.decls.iter_mut().find(|s| s.is_none()) else {
            say!(
                "warn: more than {MAX_DEVICES} virtio devices, 0x{:08x} ignored",
                d.base
            );
            return;
        };
        let t = Transport {
            base: d.base,
            gsi: d.gsi,
        };
        let p = t.probe();
        if p.magic != MAGIC {
            say!(
                "virtio: 0x{:08x} gsi {} no device (magic 0x{:08x})",
                d.base,
                d.gsi,
                p.magic
            );
            return;
        }
        say!(
            "virtio: 0x{:08x} gsi {} device {} version {} vendor 0x{:08x}",
            d.base,
            d.gsi,
            p.device_id,
            p.version,
            p.vendor_id
        );
        *free = Some(t);
    }

    /// The block driver, initialised on first use (prints `blk: ready`).
    fn blk(&mut self, boot: &Boot) -> Result<&mut Blk, u32> {
        if self.blk.is_none() {
            let Some(t) = self.block_device(self.selected) else {
                say!("blk: no usable virtio-blk device");
                return Err(EXIT_NO_DEVICE);
            };
            if !boot.route_gsi(t.gsi, VEC_VIRTIO) {
                say!("blk: init failed: gsi {} is on no IOAPIC", t.gsi);
                return Err(EXIT_INIT);
            }
            let blk = Blk::init(t).map_err(|e| {
                say!("blk: init failed: {}", e.describe());
                EXIT_INIT
            })?;
            say!(
                "blk: ready capacity={} queue={} features=0x{:016x} ro={} event_idx={} indirect={} flush={}",
                blk.capacity,
                blk.queue_size(),
                blk.features,
                u8::from(blk.has(F_RO)),
                u8::from(blk.has(F_RING_EVENT_IDX)),
                u8::from(blk.has(F_RING_INDIRECT_DESC)),
                u8::from(blk.has(F_FLUSH)),
            );
            self.blk = Some(blk);
        }
        self.blk.as_mut().ok_or(EXIT_INIT)
    }

    /// The `index`-th declared modern virtio-blk transport.
    fn block_device(&self, index: usize) -> Option<Transport> {
        self.device(DEVICE_BLOCK, index)
    }

    /// The `index`-th (from 0, in declaration order) declared modern
    /// virtio-mmio transport with device id `device_id`.
    pub fn device(&self, device_id: u32, index: usize) -> Option<Transport> {
        self.decls
            .iter()
            .flatten()
            .copied()
            .filter(|t| {
                let p = t.probe();
                p.magic == MAGIC && p.version == VERSION_MODERN && p.device_id == device_id
            })
            .nth(index)
    }

    /// Run one `blk=` word. `Err(code)` is the exit code of its failure
    /// (already reported).
    pub fn run(&mut self, boot: &Boot, word: BlkWord) -> Result<(), u32> {
        if let BlkWord::Use { index } = word {
            // Reset the device in use; the next word initialises the new one.
            self.blk = None;
            self.selected = index as usize;
            return match self.block_device(self.selected) {
                Some(t) => {
                    say!("blk: using device {index} at 0x{:08x}", t.base);
                    Ok(())
                }
                None => {
                    say!("blk: no virtio-blk device {index}");
                    Err(EXIT_NO_DEVICE)
                }
            };
        }
        let blk = self.blk(boot)?;
        let result = match word {
            BlkWord::Write { seed, blocks } => write(blk, seed, blocks),
            BlkWord::Verify { seed, blocks } => verify(blk, seed, blocks),
            BlkWord::Id => id(blk),
            BlkWord::ExpectRo => expect_ro(blk),
            BlkWord::Bad(kind) => bad(blk, kind),
            BlkWord::Bench { kind, ops, depth } => bench(blk, kind, ops, depth as usize),
            BlkWord::Use { .. } => Ok(()),
        };
        if let Err(stop) = result {
            // Requests may still be in flight or the device be broken: reset
            // it (drop); the next word initialises it again.
            if stop.reset {
                self.blk = None;
            }
            if stop.code != 0 {
                return Err(stop.code);
            }
        }
        Ok(())
    }
}

/// How a word ended early.
struct Stop {
    /// Exit code (0: not a failure).
    code: u32,
    /// Whether the device must be reset before further use.
    reset: bool,
}

impl Stop {
    fn fail(code: u32) -> Stop {
        Stop { code, reset: true }
    }
}

fn wait_failed(e: WaitError) -> Stop {
    match e {
        WaitError::Timeout => {
            say!("blk: timeout");
            Stop::fail(EXIT_TIMEOUT)
        }
        WaitError::NeedsReset => {
            say!("blk: device needs reset");
            Stop::fail(EXIT_NEEDS_RESET)
        }
    }
}

/// One request of a pipeline.
struct Req {
    kind: u32,
    sector: u64,
    len: usize,
}

/// Run `ops` requests with up to `depth` (at most `QUEUE_DEPTH`) in flight. `prepare(op,
/// buffer)` describes request `op` (and fills its buffer for a write);
/// `finish(op, buffer, status)` checks it.
fn pipeline(
    blk: &mut Blk,
    ops: u32,
    depth: usize,
    wd: &mut Watchdog,
    mut prepare: impl FnMut(u32, &mut crate::drivers::virtio_blk::Buffer) -> Req,
    mut finish: impl FnMut(u32, &crate::drivers::virtio_blk::Buffer, u8) -> Result<(), Stop>,
) -> Result<(), Stop> {
    let mut slot_op = [0u32; QUEUE_DEPTH];
    let mut comps: Completions = completions();
    let (mut next, mut done) = (0u32, 0u32);
    while done < ops {
        while next < ops && blk.in_flight() < depth {
            let Some(slot) = blk.free_slot() else { break };
            let req = prepare(next, blk.buffer(slot));
            match blk.submit(slot, req.kind, req.sector, req.len) {
                Ok(()) => {
                    slot_op[slot] = next;
                    next += 1;
                }
                Err(SubmitError::NoDescriptors) if blk.in_flight() > 0 => break,
                Err(e) => {
                    say!("blk: cannot post a request ({e:?})");
                    return Err(Stop::fail(EXIT_IO));
                }
            }
        }
        let n = blk.wait(wd, &mut comps).map_err(wait_failed)?;
        for c in &comps[..n] {
            match c.done {
                Done::Slot(slot) => {
                    done += 1;
                    finish(slot_op[slot], blk.buffer(slot), c.status)?;
                }
                Done::Bad | Done::Unknown(_) => {
                    say!("blk: device returned a chain that was not posted");
                    return Err(Stop::fail(EXIT_NEEDS_RESET));
                }
            }
        }
    }
    Ok(())
}

fn fits(blk: &Blk, sectors: u64) -> Result<(), Stop> {
    if sectors > blk.capacity {
        say!(
            "blk: {} sectors exceed the capacity ({} sectors)",
            sectors,
            blk.capacity
        );
        return Err(Stop {
            code: EXIT_IO,
            reset: false,
        });
    }
    Ok(())
}

/// A single request in slot 0; returns its status.
fn single(blk: &mut Blk, kind: u32, sector: u64, len: usize) -> Result<u8, Stop> {
    let mut status = S_UNWRITTEN;
    let mut wd = Watchdog::start(REQ_PERIOD_NS);
    let r = pipeline(
        blk,
        1,
        1,
        &mut wd,
        |_, _| Req { kind, sector, len },
        |_, _, s| {
            status = s;
            Ok(())
        },
    );
    wd.stop();
    r.map(|()| status)
}

fn write(blk: &mut Blk, seed: u64, blocks: u32) -> Result<(), Stop> {
    fits(blk, u64::from(blocks) * SECTORS_PER_BLOCK)?;
    let mut wd = Watchdog::start(REQ_PERIOD_NS);
    let r = pipeline(
        blk,
        blocks,
        QUEUE_DEPTH,
        &mut wd,
        |op, buf| {
            fill_block(seed, u64::from(op), &mut buf[0]);
            Req {
                kind: T_OUT,
                sector: u64::from(op) * SECTORS_PER_BLOCK,
                len: BLOCK_SIZE,
            }
        },
        |op, _, status| match status {
            S_OK => Ok(()),
            s => {
                say!("blk: write failed at block {op} ({})", StatusName(s));
                Err(Stop::fail(EXIT_IO))
            }
        },
    );
    wd.stop();
    r?;
    say!("blk: wrote {blocks} blocks");
    if !blk.has(F_FLUSH) {
        say!("blk: flush not offered");
        return Ok(());
    }
    match single(blk, T_FLUSH, 0, 0)? {
        S_OK => {
            say!("blk: flush ok");
            Ok(())
        }
        s => {
            say!("blk: flush failed ({})", StatusName(s));
            Err(Stop {
                code: EXIT_IO,
                reset: false,
            })
        }
    }
}

fn verify(blk: &mut Blk, seed: u64, blocks: u32) -> Result<(), Stop> {
    fits(blk, u64::from(blocks) * SECTORS_PER_BLOCK)?;
    let mut first_bad: Option<u32> = None;
    let mut wd = Watchdog::start(REQ_PERIOD_NS);
    let r = pipeline(
        blk,
        blocks,
        QUEUE_DEPTH,
        &mut wd,
        |op, _| Req {
            kind: T_IN,
            sector: u64::from(op) * SECTORS_PER_BLOCK,
            len: BLOCK_SIZE,
        },
        |op, buf, status| {
            if status != S_OK {
                say!("blk: read failed at block {op} ({})", StatusName(status));
                return Err(Stop::fail(EXIT_IO));
            }
            if !block_ok(seed, u64::from(op), &buf[0]) {
                first_bad = Some(first_bad.map_or(op, |b| b.min(op)));
            }
            Ok(())
        },
    );
    wd.stop();
    r?;
    match first_bad {
        None => {
            say!("blk: verified {blocks} blocks ok");
            Ok(())
        }
        Some(k) => {
            say!("blk: verify failed at block {k}");
            Err(Stop {
                code: EXIT_VERIFY,
                reset: false,
            })
        }
    }
}

fn id(blk: &mut Blk) -> Result<(), Stop> {
    const ID_LEN: usize = 20;
    match single(blk, T_GET_ID, 0, ID_LEN)? {
        S_OK => {}
        s => {
            say!("blk: id failed ({})", StatusName(s));
            return Err(Stop {
                code: EXIT_IO,
                reset: false,
            });
        }
    }
    let mut text = [0u8; ID_LEN];
    let raw = &blk.buffer(0)[0][..ID_LEN];
    let len = raw.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
    for (t, &b) in text.iter_mut().zip(&raw[..len]) {
        *t = if b.is_ascii_graphic() || b == b' ' {
            b
        } else {
            b'?'
        };
    }
    say!(
        "blk: id {}",
        core::str::from_utf8(&text[..len]).unwrap_or("?")
    );
    Ok(())
}

fn expect_ro(blk: &mut Blk) -> Result<(), Stop> {
    fill_block(0, 0, &mut blk.buffer(0)[0]);
    let status = single(blk, T_OUT, 0, BLOCK_SIZE)?;
    let not_refused = Stop {
        code: EXIT_NOT_REFUSED,
        reset: false,
    };
    match status {
        S_IOERR => {
            say!("blk: write refused (ioerr)");
            Ok(())
        }
        S_OK => {
            say!("blk: write accepted on a read-only device");
            Err(not_refused)
        }
        s => {
            say!("blk: write refused ({})", StatusName(s));
            Err(not_refused)
        }
    }
}

fn bad(blk: &mut Blk, kind: BadKind) -> Result<(), Stop> {
    if let Err(e) = blk.post_bad(kind) {
        say!("blk: cannot post bad={} ({e:?})", kind.name());
        return Err(Stop::fail(EXIT_IO));
    }
    let mut comps = completions();
    let mut wd = Watchdog::start(BAD_PERIOD_NS);
    let r = blk.wait(&mut wd, &mut comps);
    wd.stop();
    match r {
        Ok(n) => {
            for c in &comps[..n] {
                say!("blk: bad={} used_len={}", kind.name(), c.used_len);
                if let Done::Unknown(head) = c.done {
                    say!("warn: blk: used element names head {head}, never posted");
                }
            }
            // An unknown head already marked the device for a reset.
            if comps[..n].iter().any(|c| c.done != Done::Bad) {
                return Err(Stop {
                    code: 0,
                    reset: true,
                });
            }
            Ok(())
        }
        Err(WaitError::NeedsReset) => {
            say!("blk: bad={} needs-reset", kind.name());
            Err(Stop {
                code: 0,
                reset: true,
            })
        }
        Err(WaitError::Timeout) => {
            say!("blk: timeout");
            Err(Stop::fail(EXIT_TIMEOUT))
        }
    }
}

/// xorshift64: the benchmark's offsets (deterministic run to run).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn bench(blk: &mut Blk, kind: BenchKind, ops: u32, depth: usize) -> Result<(), Stop> {
    let unit = u64::from(kind.request_bytes()) / 512;
    let units = blk.capacity / unit;
    if units == 0 {
        return fits(blk, unit);
    }
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let len = kind.request_bytes() as usize;
    let mut wd = Watchdog::start(REQ_PERIOD_NS);
    let r = pipeline(
        blk,
        ops,
        depth,
        &mut wd,
        |op, _| match kind {
            BenchKind::RandRead | BenchKind::RandWrite => Req {
                kind: if kind == BenchKind::RandRead {
                    T_IN
                } else {
                    T_OUT
                },
                sector: xorshift(&mut rng) % units * unit,
                len,
            },
            BenchKind::SeqRead => Req {
                kind: T_IN,
                sector: u64::from(op) % units * unit,
                len,
            },
        },
        |_, _, status| match status {
            S_OK => Ok(()),
            s => {
                say!("blk: bench {} failed ({})", kind.name(), StatusName(s));
                Err(Stop::fail(EXIT_IO))
            }
        },
    );
    let ns = wd.stop();
    r?;
    say!("blk: bench {} {} ops in {} us", kind.name(), ops, ns / 1000);
    Ok(())
}
