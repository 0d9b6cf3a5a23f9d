use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::{ChannelError, Mapping, SealedMemfd};

/// Bytes reserved at the start of a ring mapping for its header.
pub const RING_HEADER_SIZE: u64 = 256;
const MAGIC: u64 = 0x7076_7269_6e67_0001; // "pvring" v1
const OFF_MAGIC: usize = 0;
const OFF_SLOT_SIZE: usize = 8;
const OFF_SLOTS: usize = 12;
const OFF_TAIL: usize = 64; // producer index, own cache line
const OFF_HEAD: usize = 128; // consumer index, own cache line
const OFF_SLEEPING: usize = 192; // consumer asks for a doorbell
const LEN_PREFIX: usize = 4;

/// Shape of a ring: `slots` fixed-size slots of `slot_size` bytes each (a
/// 4-byte length prefix plus payload). Both sides agree on it out of band;
/// the header copy in shared memory is checked, never trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    /// Number of slots, a power of two.
    pub slots: u32,
    /// Bytes per slot, a multiple of 8, at least 16.
    pub slot_size: u32,
}

impl RingGeometry {
    /// Validates the geometry.
    pub fn validate(&self) -> Result<(), ChannelError> {
        if self.slots == 0 || !self.slots.is_power_of_two() {
            return Err(ChannelError::Geometry(
                "slot count must be a non-zero power of two",
            ));
        }
        if self.slot_size < 16 || self.slot_size % 8 != 0 {
            return Err(ChannelError::Geometry(
                "slot size must be a multiple of 8 and at least 16",
            ));
        }
        if u64::from(self.slots) * u64::from(self.slot_size) > (1 << 30) {
            return Err(ChannelError::Geometry("ring larger than 1 GiB"));
        }
        Ok(())
    }

    /// Total bytes of the ring's memfd.
    pub fn bytes(&self) -> u64 {
        RING_HEADER_SIZE + u64::from(self.slots) * u64::from(self.slot_size)
    }

    /// Largest message one slot carries.
    pub fn max_payload(&self) -> usize {
        self.slot_size as usize - LEN_PREFIX
    }

    /// Creates a sealed memfd holding an empty ring of this shape.
    pub fn create(&self, name: &str) -> Result<SealedMemfd, ChannelError> {
        self.validate()?;
        let fd = SealedMemfd::create(name, self.bytes())?;
        let map = fd.map(true)?;
        map.write_at(OFF_MAGIC as u64, &MAGIC.to_ne_bytes())?;
        map.write_at(OFF_SLOT_SIZE as u64, &self.slot_size.to_ne_bytes())?;
        map.write_at(OFF_SLOTS as u64, &self.slots.to_ne_bytes())?;
        Ok(fd)
    }

    fn check_mapping(&self, map: &Mapping) -> Result<(), ChannelError> {
        self.validate()?;
        if (map.len() as u64) < self.bytes() || !map.writable() {
            return Err(ChannelError::Geometry(
                "mapping too small or read-only for ring",
            ));
        }
        let mut b8 = [0u8; 8];
        map.read_at(OFF_MAGIC as u64, &mut b8)?;
        let mut b4 = [0u8; 4];
        map.read_at(OFF_SLOT_SIZE as u64, &mut b4)?;
        let slot_size = u32::from_ne_bytes(b4);
        map.read_at(OFF_SLOTS as u64, &mut b4)?;
        let slots = u32::from_ne_bytes(b4);
        if u64::from_ne_bytes(b8) != MAGIC || slot_size != self.slot_size || slots != self.slots {
            return Err(ChannelError::Corrupt(
                "ring header does not match the agreed geometry",
            ));
        }
        Ok(())
    }
}

fn atomic_u64(map: &Mapping, off: usize) -> &AtomicU64 {
    // SAFETY: off is a fixed, 8-aligned header offset inside a mapping checked
    // to be at least RING_HEADER_SIZE long (mmap returns page-aligned memory);
    // AtomicU64 permits shared mutation, including by another process.
    unsafe { &*(map.as_ptr().add(off).cast::<AtomicU64>()) }
}

fn atomic_u32(map: &Mapping, off: usize) -> &AtomicU32 {
    // SAFETY: as for atomic_u64, with a 4-aligned offset.
    unsafe { &*(map.as_ptr().add(off).cast::<AtomicU32>()) }
}

/// The writing end of a ring. Exactly one exists per ring.
#[derive(Debug)]
pub struct RingProducer {
    map: Arc<Mapping>,
    geo: RingGeometry,
    tail: u64,
    head_cache: u64,
}

impl RingProducer {
    /// Attaches to a freshly created ring.
    pub fn new(map: Arc<Mapping>, geo: RingGeometry) -> Result<Self, ChannelError> {
        geo.check_mapping(&map)?;
        let tail = atomic_u64(&map, OFF_TAIL).load(Ordering::Acquire);
        let head = atomic_u64(&map, OFF_HEAD).load(Ordering::Acquire);
        if tail != head {
            return Err(ChannelError::Corrupt(
                "producer attached to a non-empty ring",
            ));
        }
        Ok(RingProducer {
            map,
            geo,
            tail,
            head_cache: head,
        })
    }

    /// Appends one message. Returns `Ok(false)` when the ring is full.
    pub fn try_push(&mut self, msg: &[u8]) -> Result<bool, ChannelError> {
        let max = self.geo.max_payload();
        if msg.len() > max {
            return Err(ChannelError::MessageTooLarge {
                len: msg.len(),
                max,
            });
        }
        let slots = u64::from(self.geo.slots);
        if self.tail.wrapping_sub(self.head_cache) >= slots {
            let head = atomic_u64(&self.map, OFF_HEAD).load(Ordering::Acquire);
            // The consumer's index must lie in [tail - slots, tail].
            if head > self.tail || self.tail - head > slots {
                return Err(ChannelError::Corrupt("consumer index out of range"));
            }
            self.head_cache = head;
            if self.tail - head >= slots {
                return Ok(false);
            }
        }
        let slot = RING_HEADER_SIZE + (self.tail & (slots - 1)) * u64::from(self.geo.slot_size);
        self.map.write_at(slot, &(msg.len() as u32).to_ne_bytes())?;
        self.map.write_at(slot + LEN_PREFIX as u64, msg)?;
        self.tail += 1;
        atomic_u64(&self.map, OFF_TAIL).store(self.tail, Ordering::Release);
        Ok(true)
    }

    /// After pushing: does the consumer want a doorbell? (It raised its
    /// sleeping flag.) The fence pairs with the one in [`RingConsumer::set_sleeping`].
    pub fn consumer_sleeping(&self) -> bool {
        fence(Ordering::SeqCst);
        atomic_u32(&self.map, OFF_SLEEPING).load(Ordering::Relaxed) != 0
    }

    /// Messages pushed and not yet known to be consumed.
    pub fn in_flight(&self) -> u64 {
        self.tail - self.head_cache
    }

    /// Largest message accepted.
    pub fn max_payload(&self) -> usize {
        self.geo.max_payload()
    }
}

/// The reading end of a ring. Exactly one exists per ring.
#[derive(Debug)]
pub struct RingConsumer {
    map: Arc<Mapping>,
    geo: RingGeometry,
    head: u64,
    tail_cache: u64,
}

impl RingConsumer {
    /// Attaches to a freshly created ring.
    pub fn new(map: Arc<Mapping>, geo: RingGeometry) -> Result<Self, ChannelError> {
        geo.check_mapping(&map)?;
        let head = atomic_u64(&map, OFF_HEAD).load(Ordering::Acquire);
        Ok(RingConsumer {
            map,
            geo,
            head,
            tail_cache: head,
        })
    }

    fn refresh(&mut self) -> Result<(), ChannelError> {
        let tail = atomic_u64(&self.map, OFF_TAIL).load(Ordering::Acquire);
        if tail < self.head || tail - self.head > u64::from(self.geo.slots) {
            return Err(ChannelError::Corrupt("producer index out of range"));
        }
        self.tail_cache = tail;
        Ok(())
    }

    /// True if a message is waiting.
    pub fn has_data(&mut self) -> Result<bool, ChannelError> {
        if self.head != self.tail_cache {
            return Ok(true);
        }
        self.refresh()?;
        Ok(self.head != self.tail_cache)
    }

    /// Copies the next message into `buf` (which must hold
    /// [`RingGeometry::max_payload`] bytes) and returns its length.
    pub fn try_pop(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        if !self.has_data()? {
            return Ok(None);
        }
        let slots = u64::from(self.geo.slots);
        let slot = RING_HEADER_SIZE + (self.head & (slots - 1)) * u64::from(self.geo.slot_size);
        let mut b4 = [0u8; 4];
        self.map.read_at(slot, &mut b4)?;
        let len = u32::from_ne_bytes(b4) as usize;
        if len > self.geo.max_payload() {
            return Err(ChannelError::Corrupt("slot length exceeds slot size"));
        }
        if buf.len() < len {
            return Err(ChannelError::MessageTooLarge {
                len,
                max: buf.len(),
            });
        }
        self.map
            .read_at(slot + LEN_PREFIX as u64, &mut buf[..len])?;
        self.head += 1;
        atomic_u64(&self.map, OFF_HEAD).store(self.head, Ordering::Release);
        Ok(Some(len))
    }

    /// Raises or lowers the "wake me with the doorbell" flag. After raising
    /// it the caller must re-check [`RingConsumer::has_data`] before blocking.
    pub fn set_sleeping(&self, sleeping: bool) {
        atomic_u32(&self.map, OFF_SLEEPING).store(u32::from(sleeping), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Largest message this ring carries.
    pub fn max_payload(&self) -> usize {
        self.geo.max_payload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(geo: RingGeometry) -> (RingProducer, RingConsumer, Arc<Mapping>) {
        let fd = geo.create("test-ring").unwrap();
        let map = Arc::new(fd.map(true).unwrap());
        let p = RingProducer::new(map.clone(), geo).unwrap();
        let c = RingConsumer::new(map.clone(), geo).unwrap();
        (p, c, map)
    }

    #[test]
    fn messages_come_out_in_order_and_full_ring_refuses() {
        let geo = RingGeometry {
            slots: 4,
            slot_size: 32,
        };
        let (mut p, mut c, _m) = pair(geo);
        for i in 0..4u8 {
            assert!(p.try_push(&[i; 5]).unwrap());
        }
        assert!(
            !p.try_push(b"x").unwrap(),
            "fifth push into 4 slots must report full"
        );
        let mut buf = [0u8; 28];
        for i in 0..4u8 {
            assert_eq!(c.try_pop(&mut buf).unwrap(), Some(5));
            assert_eq!(&buf[..5], &[i; 5]);
        }
        assert_eq!(c.try_pop(&mut buf).unwrap(), None);
        // wraps around
        for round in 0..10u8 {
            assert!(p.try_push(&[round]).unwrap());
            assert_eq!(c.try_pop(&mut buf).unwrap(), Some(1));
            assert_eq!(buf[0], round);
        }
    }

    #[test]
    fn oversized_message_is_rejected() {
        let geo = RingGeometry {
            slots: 2,
            slot_size: 16,
        };
        let (mut p, _c, _m) = pair(geo);
        assert!(matches!(
            p.try_push(&[0; 13]),
            Err(ChannelError::MessageTooLarge { len: 13, max: 12 })
        ));
    }

    #[test]
    fn forged_producer_index_is_detected_not_followed() {
        let geo = RingGeometry {
            slots: 4,
            slot_size: 32,
        };
        let (_p, mut c, map) = pair(geo);
        map.write_at(OFF_TAIL as u64, &1000u64.to_ne_bytes())
            .unwrap();
        let mut buf = [0u8; 28];
        assert!(matches!(c.try_pop(&mut buf), Err(ChannelError::Corrupt(_))));
    }

    #[test]
    fn forged_slot_length_is_detected() {
        let geo = RingGeometry {
            slots: 4,
            slot_size: 32,
        };
        let (mut p, mut c, map) = pair(geo);
        p.try_push(b"hello").unwrap();
        map.write_at(RING_HEADER_SIZE, &u32::MAX.to_ne_bytes())
            .unwrap();
        let mut buf = [0u8; 28];
        assert!(matches!(c.try_pop(&mut buf), Err(ChannelError::Corrupt(_))));
    }

    #[test]
    fn forged_consumer_index_is_detected() {
        let geo = RingGeometry {
            slots: 2,
            slot_size: 16,
        };
        let (mut p, _c, map) = pair(geo);
        p.try_push(b"a").unwrap();
        p.try_push(b"b").unwrap();
        map.write_at(OFF_HEAD as u64, &77u64.to_ne_bytes()).unwrap();
        assert!(matches!(p.try_push(b"c"), Err(ChannelError::Corrupt(_))));
    }

    #[test]
    fn mismatched_geometry_is_refused() {
        let geo = RingGeometry {
            slots: 4,
            slot_size: 32,
        };
        let fd = geo.create("g").unwrap();
        let map = Arc::new(fd.map(true).unwrap());
        let other = RingGeometry {
            slots: 2,
            slot_size: 32,
        };
        assert!(RingConsumer::new(map, other).is_err());
    }

    #[test]
    fn sleeping_flag_is_visible_to_producer() {
        let geo = RingGeometry {
            slots: 2,
            slot_size: 16,
        };
        let (p, c, _m) = pair(geo);
        assert!(!p.consumer_sleeping());
        c.set_sleeping(true);
        assert!(p.consumer_sleeping());
        c.set_sleeping(false);
        assert!(!p.consumer_sleeping());
    }
}
