//! The `vsock=` word parser and the stream pattern, as the guest compiles
//! them (`src/words.rs` is shared with this crate).

use partvisor_test_guest::words::{parse_vsock, vsock_pattern, VsockWord};

#[test]
fn vsock_words_parse_with_sizes_and_bad_ones_are_refused() {
    assert_eq!(parse_vsock("cid"), Some(VsockWord::Cid));
    assert_eq!(
        parse_vsock("listen:5000:1M"),
        Some(VsockWord::Listen {
            port: 5000,
            recv: 1 << 20,
            send: 0
        })
    );
    assert_eq!(
        parse_vsock("listen:5000:1G:1G"),
        Some(VsockWord::Listen {
            port: 5000,
            recv: 1 << 30,
            send: 1 << 30
        })
    );
    assert_eq!(
        parse_vsock("send:4:5000:64K"),
        Some(VsockWord::Send {
            cid: 4,
            port: 5000,
            send: 64 << 10,
            recv: 0,
            packet: 64 << 10
        })
    );
    assert_eq!(
        parse_vsock("send:4:5000:64K:1M"),
        Some(VsockWord::Send {
            cid: 4,
            port: 5000,
            send: 64 << 10,
            recv: 1 << 20,
            packet: 64 << 10
        })
    );
    assert_eq!(
        parse_vsock("send:4:5000:64K:0:4052"),
        Some(VsockWord::Send {
            cid: 4,
            port: 5000,
            send: 64 << 10,
            recv: 0,
            packet: 4052
        })
    );
    assert_eq!(parse_vsock("echo:7"), Some(VsockWord::Echo { port: 7 }));
    assert_eq!(
        parse_vsock("ping:2:7:1000:64"),
        Some(VsockWord::Ping {
            cid: 2,
            port: 7,
            count: 1000,
            size: 64
        })
    );
    for bad in [
        "",
        "cid:3",
        "listen:5000",
        "listen:5000:1M:2:3",
        "listen:5000:1M:x",
        "send:4:5000",
        "send:4:5000:1M:0:0",
        "send:4:5000:1M:0:65537",
        "send:4:5000:1M:0:4K:1",
        "send:4:4294967296:1",
        "send:4:4294967295:1",
        "send:4:5000:1:1:1:1",
        "listen:x:1",
        "connect:4:5000:1",
        "echo",
        "echo:1:2",
        "ping:4:7:0:64",
        "ping:4:7:2049:64",
        "ping:4:7:10:4053",
        "ping:4:7:10",
    ] {
        assert_eq!(parse_vsock(bad), None, "{bad:?}");
    }
}

#[test]
fn the_vsock_pattern_varies_so_a_shifted_or_repeated_stream_is_caught() {
    let first: Vec<u8> = (0..4096).map(vsock_pattern).collect();
    let shifted: Vec<u8> = (1..4097).map(vsock_pattern).collect();
    assert_ne!(first, shifted);
    let page2: Vec<u8> = (4096..8192).map(vsock_pattern).collect();
    assert_ne!(first, page2, "a repeated page is caught");
    let distinct = first
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(distinct > 200, "{distinct} distinct byte values");
}
