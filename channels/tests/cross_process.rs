//! A ring and its doorbell shared between two processes: the test binary
//! re-executes itself as the producer.

// Test and benchmark code: a failed step should fail the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::cell::RefCell;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use channels::{
    scm, Doorbell, RingConsumer, RingGeometry, RingProducer, SealedMemfd, WaitOutcome, Waiter,
};

const GEO: RingGeometry = RingGeometry {
    slots: 256,
    slot_size: 24,
};
const N: u64 = 50_000;
const ENV: &str = "CHANNELS_TEST_PRODUCER_SOCKET";

fn producer(path: &str) {
    let sock = UnixStream::connect(path).unwrap();
    let mut buf = [0u8; 8];
    let (_, mut fds) = scm::recv(&sock, &mut buf).unwrap();
    assert_eq!(fds.len(), 2);
    let bell = Doorbell::from_received(fds.pop().unwrap()).unwrap();
    let ring = SealedMemfd::from_received(fds.pop().unwrap(), GEO.bytes()).unwrap();
    let mut p = RingProducer::new(Arc::new(ring.map(true).unwrap()), GEO).unwrap();
    for i in 0..N {
        while !p.try_push(&i.to_le_bytes()).unwrap() {
            std::hint::spin_loop();
        }
        if p.consumer_sleeping() {
            bell.notify().unwrap();
        }
        // A short gap after every message lets the consumer catch up and
        // find the ring empty (the spinning case); a long pause every 5 000
        // messages outlasts its spin budget (the blocking case).
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_micros(3) {
            std::hint::spin_loop();
        }
        if i % 5_000 == 4_999 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn ring_and_doorbell_carry_messages_between_processes_in_order() {
    if let Ok(path) = std::env::var(ENV) {
        producer(&path);
        return;
    }
    let path = std::env::temp_dir().join(format!("channels-xproc-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ring_and_doorbell_carry_messages_between_processes_in_order",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    let ring = GEO.create("xproc").unwrap();
    let bell = Doorbell::new().unwrap();
    scm::send(&sock, b"ring", &[ring.fd(), bell.fd()]).unwrap();
    let cons = RefCell::new(RingConsumer::new(Arc::new(ring.map(true).unwrap()), GEO).unwrap());
    let mut waiter = Waiter::new(Duration::from_micros(100));
    let (mut next, mut spun, mut woken) = (0u64, 0u32, 0u32);
    let mut buf = [0u8; 20];
    while next < N {
        if let Some(n) = cons.borrow_mut().try_pop(&mut buf).unwrap() {
            assert_eq!(n, 8);
            assert_eq!(
                u64::from_le_bytes(buf[..8].try_into().unwrap()),
                next,
                "messages out of order"
            );
            next += 1;
            continue;
        }
        match channels::wait_ring(&mut waiter, &cons, &bell, Duration::from_secs(10)).unwrap() {
            WaitOutcome::Spun => spun += 1,
            WaitOutcome::Woken => woken += 1,
            WaitOutcome::TimedOut => panic!("producer stalled at {next}"),
            WaitOutcome::Extra => {}
        }
    }
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_file(&path);
    assert!(
        woken >= 5,
        "the pauses must have put the consumer to sleep ({woken} wake-ups)"
    );
    assert!(spun > 0, "back-to-back traffic must be caught by spinning");
}
