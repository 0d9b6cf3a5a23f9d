//! Frames a guest queues for transmission on a switch port, parsed and
//! delivered by part-io's switch to the other port's guest: every chain is
//! completed or refused as malformed, spoofed or oversized frames are
//! dropped and counted, and delivery never writes outside the receiver's
//! posted buffers.
//!
//! Input: the sending port's transmit queue (`vring.rs`); the sender's MAC
//! is 02:00:00:00:00:0a, the receiver's 02:00:00:00:00:0b.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use part_io::device::DeviceModel;
use part_io::net::{PortEndpoint, PortSpec, Switch};
use part_io::server::Endpoint;

#[path = "vring.rs"]
mod vring;

fuzz_target!(|data: &[u8]| {
    let ports: Vec<PortSpec> = ["a", "b"]
        .iter()
        .zip(["0a", "0b"])
        .filter_map(|(p, m)| {
            format!("socket=/nonexistent/{p}.sock,mac=02:00:00:00:00:{m}")
                .parse()
                .ok()
        })
        .collect();
    let Ok(switch) = Switch::new(ports, None) else {
        return;
    };
    let (Some(tx_mem), Some((rx_mem, rx_queues))) = (vring::guest(data), vring::receiver()) else {
        return;
    };
    let sender = Arc::new(PortEndpoint::new(switch.clone(), 0));
    let receiver = Arc::new(PortEndpoint::new(switch, 1));
    let mut b = receiver.new_model(&rx_mem);
    b.kicked(&rx_queues);
    let mut a = sender.new_model(&tx_mem);
    let Some(tx) = vring::queue(&tx_mem) else {
        return;
    };
    let a_queues = [tx.clone(), tx.clone()];
    a.kicked(&a_queues);
    let _ = a.process_queue(1, &tx);
});
