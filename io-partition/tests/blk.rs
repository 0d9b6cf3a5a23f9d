//! `part-io blk` driven by a test-side vhost-user frontend.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT};
use vm_memory::GuestAddress;

const IMG_SIZE: u64 = 1 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;

/// Starts part-io with `n` exports (`extra[i]` appended to export i's spec).
fn start(n: usize, extra: &[&str]) -> PartIo {
    let dir = setup(n, IMG_SIZE);
    let specs: Vec<String> = (0..n)
        .map(|i| export(dir.path(), i, extra.get(i).copied().unwrap_or("")))
        .collect();
    PartIo::spawn(dir, &specs)
}

fn img(p: &PartIo, i: usize) -> std::path::PathBuf {
    p.dir.path().join(format!("img{i}.raw"))
}

fn connect(p: &PartIo, i: usize) -> Device {
    Device::connect(&sock(p.dir.path(), i), guest_memory(SEALED), false).unwrap()
}

#[test]
fn write_then_read_back_lands_in_the_image_file() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    let data = pattern(7, 8192);
    assert_eq!(d.write_sectors(10, &data), OK);
    assert_eq!(read_file_range(&img(&p, 0), 10 * 512, data.len()), data);
    let (status, back) = d.read_sectors(10, data.len());
    assert_eq!(status, OK);
    assert_eq!(back, data);
    // The last sector of the disk is reachable.
    let last = pattern(9, 512);
    assert_eq!(d.write_sectors(IMG_SIZE / 512 - 1, &last), OK);
    assert_eq!(read_file_range(&img(&p, 0), IMG_SIZE - 512, 512), last);
}

#[test]
fn config_space_reports_capacity_in_sectors() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    let c = d.config(0, 36);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(c[..8].try_into().unwrap()),
        IMG_SIZE / 512
    );
    assert_eq!(u32_at(12), 126, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 1, "num_queues");
    assert_ne!(d.features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(d.features & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn flush_completes_ok() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    assert_eq!(d.write_sectors(0, &pattern(1, 512)), OK);
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, 0), (OK, 1));
}

#[test]
fn get_id_returns_the_configured_serial() {
    let p = start(2, &["", ",id=disk-serial-0001"]);
    let mut d = connect(&p, 1);
    let (status, len) = d.request(VIRTIO_BLK_T_GET_ID, 0, 20);
    assert_eq!((status, len), (OK, 21));
    let mut id = [0u8; 20];
    vm_memory::Bytes::read_slice(&d.mem, &mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk-serial-0001\0\0\0\0");
    // Default serial: the image file name.
    let mut d0 = connect(&p, 0);
    d0.request(VIRTIO_BLK_T_GET_ID, 0, 20);
    vm_memory::Bytes::read_slice(&d0.mem, &mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"img0.raw\0");
}

#[test]
fn out_of_range_and_unknown_requests_get_ioerr_and_unsupp() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    // One sector past the end, and a read straddling the end.
    assert_eq!(d.read_sectors(IMG_SIZE / 512, 512).0, IOERR);
    assert_eq!(d.read_sectors(IMG_SIZE / 512 - 1, 1024).0, IOERR);
    assert_eq!(d.write_sectors(u64::MAX / 256, &pattern(3, 512)), IOERR);
    // Data length not a multiple of the sector size.
    assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, 100).0, IOERR);
    assert_eq!(d.request(99, 0, 0), (UNSUPP, 1));
    assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, 0).0, UNSUPP);
    // And the device still works.
    assert_eq!(d.write_sectors(1, &pattern(4, 512)), OK);
}

#[test]
fn read_only_export_fails_writes_with_ioerr_and_leaves_the_file_unchanged() {
    let dir = setup(1, IMG_SIZE);
    let image = dir.path().join("img0.raw");
    let original = pattern(42, IMG_SIZE as usize);
    std::fs::write(&image, &original).unwrap();
    let spec = export(dir.path(), 0, ",readonly");
    let p = PartIo::spawn(dir, &[spec]);
    let mut d = connect(&p, 0);
    assert_ne!(
        d.features & (1 << VIRTIO_BLK_F_RO),
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(d.write_sectors(0, &pattern(1, 4096)), IOERR);
    assert_eq!(std::fs::read(&image).unwrap(), original);
    let (status, back) = d.read_sectors(8, 1024);
    assert_eq!(status, OK);
    assert_eq!(back, original[8 * 512..8 * 512 + 1024]);
}

#[test]
fn two_frontends_on_one_process_each_use_their_own_image() {
    let p = start(2, &[]);
    let mut a = connect(&p, 0);
    let mut b = connect(&p, 1);
    let (pa, pb) = (pattern(0xa, 4096), pattern(0xb, 4096));
    assert_eq!(a.write_sectors(4, &pa), OK);
    assert_eq!(b.write_sectors(4, &pb), OK);
    assert_eq!(a.read_sectors(4, 4096), (OK, pa.clone()));
    assert_eq!(b.read_sectors(4, 4096), (OK, pb.clone()));
    assert_eq!(read_file_range(&img(&p, 0), 2048, 4096), pa);
    assert_eq!(read_file_range(&img(&p, 1), 2048, 4096), pb);
}

/// Writes one malformed chain's descriptors (head 0).
type ChainBuilder = Box<dyn Fn(&Device)>;

/// Posts a chain built by `build` (head 0) and expects a zero-length used entry.
fn expect_zero_length(d: &mut Device, build: impl FnOnce(&Device)) {
    d.write_header(VIRTIO_BLK_T_IN, 0);
    build(d);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 0));
}

#[test]
fn malformed_chains_get_zero_length_used_entries_and_other_export_keeps_working() {
    let p = start(2, &[]);
    let mut bad = connect(&p, 0);
    let mut good = connect(&p, 1);
    let table = GuestAddress(INDIRECT);
    let cases: Vec<(&str, ChainBuilder)> = vec![
        (
            "loop",
            Box::new(|d: &Device| {
                d.desc(0, HDR, 16, NEXT, 1);
                d.desc(1, DATA, 512, WRITE | NEXT, 0);
            }),
        ),
        (
            "too_long",
            Box::new(move |d: &Device| {
                // An indirect table with more entries than the queue size.
                for i in 0..=QSIZE {
                    d.put_desc(table, i, DATA, 512, WRITE | NEXT, i + 1);
                }
                d.desc(0, INDIRECT, 16 * (u32::from(QSIZE) + 1), IND, 0);
            }),
        ),
        (
            "bad_indirect",
            Box::new(|d: &Device| {
                d.desc(0, INDIRECT, 24, IND, 0);
            }),
        ),
        (
            "bad_address",
            Box::new(|d: &Device| {
                d.desc(0, HDR, 16, NEXT, 1);
                d.desc(1, 0x7000_0000, 512, WRITE | NEXT, 2);
                d.desc(2, STATUS, 1, WRITE, 0);
            }),
        ),
        (
            "no_status",
            Box::new(|d: &Device| {
                d.desc(0, HDR, 16, 0, 0);
            }),
        ),
        (
            "bad_index",
            Box::new(|d: &Device| {
                d.desc(0, HDR, 16, NEXT, 200);
            }),
        ),
    ];
    for (i, (name, build)) in cases.iter().enumerate() {
        expect_zero_length(&mut bad, build);
        p.wait_log(&format!("): {name}; returned with length 0"));
        // The other guest is unaffected...
        let data = pattern(i as u8, 512);
        assert_eq!(good.write_sectors(i as u64, &data), OK, "after {name}");
        assert_eq!(good.read_sectors(i as u64, 512), (OK, data));
        // ...and the misbehaving guest still gets service for a good request.
        assert_eq!(bad.write_sectors(0, &pattern(1, 512)), OK, "after {name}");
    }
    // A head index outside the queue cannot be returned on the used ring; it
    // is counted and the queue moves on.
    bad.push_avail(QSIZE + 3);
    assert_eq!(bad.write_sectors(0, &pattern(2, 512)), OK);
    p.wait_log("): bad_head; dropped, no used entry possible");
    // An available index more than a queue size ahead leaves the ring
    // unusable until reset: nothing is read from it, nothing is completed,
    // and the other guest carries on.
    let used_before = bad.used_idx();
    let bogus = used_before.wrapping_add(QSIZE + 5);
    vm_memory::Bytes::write_obj(&bad.mem, bogus, GuestAddress(AVAIL + 2)).unwrap();
    bad.kick();
    p.wait_log("queue unusable until reset");
    assert_eq!(bad.used_idx(), used_before);
    assert_eq!(good.write_sectors(9, &pattern(9, 512)), OK);
    // Per-export counters, printed when the frontend goes away.
    drop(bad);
    let log = p.wait_log("disconnected;");
    let line = log.lines().find(|l| l.contains("disconnected;")).unwrap();
    for kind in [
        "loop",
        "too_long",
        "bad_indirect",
        "bad_address",
        "no_status",
        "bad_index",
        "bad_head",
    ] {
        assert!(
            line.contains(&format!("malformed.{kind}=1")),
            "{kind} counted once: {line}"
        );
    }
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event_is_passed() {
    let p = start(1, &[]);
    let mut d = Device::connect(&sock(p.dir.path(), 0), guest_memory(SEALED), true).unwrap();
    assert_ne!(d.features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    // Three independent flushes on descriptors 0-1, 2-3, 4-5.
    for r in 0..3u16 {
        d.desc(2 * r, HDR, 16, NEXT, 2 * r + 1);
        d.desc(2 * r + 1, STATUS + 16 * u64::from(r), 1, WRITE, 0);
    }
    d.write_header(VIRTIO_BLK_T_FLUSH, 0);
    // Interrupt only when used idx moves past 2 (i.e. after the third).
    d.set_used_event(2);
    for r in 0..2u16 {
        d.push_avail(2 * r);
        d.kick();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while d.used_idx() != r + 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(!d.take_call(), "no interrupt before used_event is passed");
    d.push_avail(4);
    d.kick();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !d.take_call() {
        assert!(
            std::time::Instant::now() < deadline,
            "interrupt after used_event"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.used_idx(), 3);
    for r in 0..3 {
        assert_eq!(d.next_used(), (2 * r, 1));
    }
}

#[test]
fn unsealed_guest_memory_is_refused_and_other_exports_keep_serving() {
    let p = start(2, &[]);
    let mut good = connect(&p, 1);
    assert_eq!(good.write_sectors(0, &pattern(5, 512)), OK);
    for (seals, missing) in [
        (0, "shrinking or growing"),
        (libc::F_SEAL_GROW, "shrinking (F_SEAL_SHRINK)"),
        (libc::F_SEAL_SHRINK, "growing (F_SEAL_GROW)"),
    ] {
        let refused = Device::connect(&sock(p.dir.path(), 0), guest_memory(seals), false);
        assert!(
            refused.is_err(),
            "memfd with seals {seals:#x} accepted: {}",
            p.log()
        );
        p.wait_log(&format!("not sealed against {missing}"));
        assert_eq!(good.write_sectors(1, &pattern(6, 512)), OK);
    }
    // The refused export still accepts a VMM that seals its memory.
    let mut retry = connect(&p, 0);
    assert_eq!(retry.write_sectors(0, &pattern(7, 512)), OK);
    assert_eq!(read_file_range(&img(&p, 0), 0, 512), pattern(7, 512));
}

#[test]
fn frontend_can_reconnect_after_going_away() {
    let p = start(1, &[]);
    let data = pattern(77, 2048);
    {
        let mut d = connect(&p, 0);
        assert_eq!(d.write_sectors(20, &data), OK);
    }
    // Reconnect at once: the new frontend waits for the old session's teardown.
    let mut d = connect(&p, 0);
    assert_eq!(d.read_sectors(20, 2048), (OK, data));
    // While it is connected, a second frontend is turned away.
    let second = Device::connect(&sock(p.dir.path(), 0), guest_memory(SEALED), false);
    assert!(second.is_err());
    p.wait_log("refusing a second frontend");
    assert_eq!(d.write_sectors(0, &pattern(1, 512)), OK);
}

#[test]
fn reconnecting_many_times_leaks_no_file_descriptors() {
    let p = start(1, &[]);
    let cycle = |n: usize| {
        let mut d = connect(&p, 0);
        assert_eq!(d.write_sectors(0, &pattern(n as u8, 512)), OK);
        drop(d);
        p.wait_log(&format!("connections={n} "));
    };
    cycle(1);
    let before = p.open_fds();
    for n in 2..=21 {
        cycle(n);
    }
    assert_eq!(p.open_fds(), before, "fds after 20 more connections");
}

#[test]
fn requests_are_served_whatever_their_descriptor_framing() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    // OUT with header and data in one descriptor.
    let data = pattern(3, 1024);
    d.write_header(VIRTIO_BLK_T_OUT, 6);
    vm_memory::Bytes::write_slice(&d.mem, &data, GuestAddress(HDR + 16)).unwrap();
    d.desc(0, HDR, 16 + 1024, NEXT, 1);
    d.desc(1, STATUS, 1, WRITE, 0);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 1));
    assert_eq!(read_file_range(&img(&p, 0), 6 * 512, 1024), data);
    // IN scattered over three descriptors, status in the last data byte's
    // descriptor (data + status share one buffer).
    d.write_header(VIRTIO_BLK_T_IN, 6);
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, DATA, 100, WRITE | NEXT, 2);
    d.desc(2, DATA + 0x1000, 412, WRITE | NEXT, 3);
    d.desc(3, DATA + 0x2000, 512 + 1, WRITE, 0);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 1025));
    let mut back = vec![0u8; 1024];
    vm_memory::Bytes::read_slice(&d.mem, &mut back[..100], GuestAddress(DATA)).unwrap();
    vm_memory::Bytes::read_slice(&d.mem, &mut back[100..512], GuestAddress(DATA + 0x1000)).unwrap();
    vm_memory::Bytes::read_slice(&d.mem, &mut back[512..], GuestAddress(DATA + 0x2000)).unwrap();
    assert_eq!(back, data);
    let status: u8 = vm_memory::Bytes::read_obj(&d.mem, GuestAddress(DATA + 0x2000 + 512)).unwrap();
    assert_eq!(status, OK);
    // IN through an indirect table.
    let table = GuestAddress(INDIRECT);
    d.put_desc(table, 0, HDR, 16, NEXT, 1);
    d.put_desc(table, 1, DATA, 1024, WRITE | NEXT, 2);
    d.put_desc(table, 2, STATUS, 1, WRITE, 0);
    d.desc(0, INDIRECT, 48, IND, 0);
    vm_memory::Bytes::write_slice(&d.mem, &[0u8; 1024], GuestAddress(DATA)).unwrap();
    d.post(0);
    assert_eq!(d.wait_used(), (0, 1025));
    vm_memory::Bytes::read_slice(&d.mem, &mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    // Data in the wrong direction (device-writable data on a write) is an
    // I/O error, and the image is untouched.
    d.write_header(VIRTIO_BLK_T_OUT, 100);
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, DATA, 512, WRITE | NEXT, 2);
    d.desc(2, STATUS, 1, WRITE, 0);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 1));
    let status: u8 = vm_memory::Bytes::read_obj(&d.mem, GuestAddress(STATUS)).unwrap();
    assert_eq!(status, IOERR);
    assert_eq!(read_file_range(&img(&p, 0), 100 * 512, 512), vec![0u8; 512]);
}

#[test]
fn buffer_spanning_two_guest_memory_regions_is_served() {
    let p = start(1, &[]);
    let mem = guest_memory_two_regions();
    let mut d = Device::connect(&sock(p.dir.path(), 0), mem, false).unwrap();
    let split = (MEM_SIZE / 2) as u64;
    let data = pattern(0x55, 2048);
    let buf = GuestAddress(split - 1024);
    vm_memory::Bytes::write_slice(&d.mem, &data, buf).unwrap();
    d.write_header(VIRTIO_BLK_T_OUT, 40);
    d.desc(0, HDR, 16, NEXT, 1);
    d.desc(1, buf.0, 2048, NEXT, 2);
    d.desc(2, STATUS, 1, WRITE, 0);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 1));
    assert_eq!(read_file_range(&img(&p, 0), 40 * 512, 2048), data);
    // Read it back into a buffer straddling the split the other way.
    let buf2 = GuestAddress(split - 512);
    vm_memory::Bytes::write_slice(&d.mem, &[0u8; 2048], buf2).unwrap();
    d.write_header(VIRTIO_BLK_T_IN, 40);
    d.desc(1, buf2.0, 2048, WRITE | NEXT, 2);
    d.post(0);
    assert_eq!(d.wait_used(), (0, 2049));
    let mut back = vec![0u8; 2048];
    vm_memory::Bytes::read_slice(&d.mem, &mut back, buf2).unwrap();
    assert_eq!(back, data);
}

#[test]
fn image_io_error_completes_with_ioerr_and_the_device_keeps_working() {
    let p = start(1, &[]);
    let mut d = connect(&p, 0);
    // Someone truncates the image under part-io: a read past the new end
    // hits end-of-file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(img(&p, 0))
        .unwrap()
        .set_len(IMG_SIZE / 2)
        .unwrap();
    assert_eq!(d.read_sectors(IMG_SIZE / 512 - 8, 4096).0, IOERR);
    p.wait_log("image I/O failed");
    assert_eq!(d.read_sectors(0, 512).0, OK);
}

#[test]
fn garbage_from_a_frontend_ends_only_its_own_connection() {
    use std::io::Write;
    let p = start(2, &[]);
    let mut good = connect(&p, 1);
    // A header announcing a 1 MiB body, then an unknown request code.
    for msg in [
        [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x10, 0].to_vec(),
        [0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0].to_vec(),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(sock(p.dir.path(), 0)).unwrap();
        s.write_all(&msg).unwrap();
        drop(s);
        assert_eq!(good.write_sectors(0, &pattern(1, 512)), OK);
    }
    p.wait_log("exceeds the vhost-user limit");
    let mut retry = connect(&p, 0);
    assert_eq!(retry.write_sectors(0, &pattern(2, 512)), OK);
}
