//! The checksummed 4 KiB blocks of `blk=write` / `blk=verify`. Pure `core`
//! code, compiled by the guest and by the host crate
//! (`partvisor_test_guest::blk_pattern`), so a host test can check an image
//! file the guest wrote.
//!
//! Block `b` of seed `s` lives at sector `8 * b` and holds:
//! `[0, 8)` [`MAGIC`], `[8, 16)` `s` (LE), `[16, 24)` `b` (LE),
//! `[24, 4088)` a splitmix64 stream seeded from `s` and `b`,
//! `[4088, 4096)` FNV-1a 64 of bytes `[0, 4088)` (LE).

/// Bytes per block.
pub const BLOCK_SIZE: usize = 4096;
/// 512-byte sectors per block.
pub const SECTORS_PER_BLOCK: u64 = 8;
/// First bytes of every block.
pub const MAGIC: [u8; 8] = *b"pvblk001";
const SUM_AT: usize = BLOCK_SIZE - 8;

/// FNV-1a, 64-bit.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Write block `block` of `seed` into `out`.
pub fn fill_block(seed: u64, block: u64, out: &mut [u8; BLOCK_SIZE]) {
    out[0..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    let mut state = seed ^ block.wrapping_mul(0xd1b5_4a32_d192_ed03);
    for chunk in out[24..SUM_AT].chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    let sum = fnv1a64(&out[..SUM_AT]);
    out[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// Whether `data` is exactly block `block` of `seed` (its own checksum
/// holds and every byte matches).
pub fn block_ok(seed: u64, block: u64, data: &[u8; BLOCK_SIZE]) -> bool {
    let sum = u64::from_le_bytes([
        data[SUM_AT],
        data[SUM_AT + 1],
        data[SUM_AT + 2],
        data[SUM_AT + 3],
        data[SUM_AT + 4],
        data[SUM_AT + 5],
        data[SUM_AT + 6],
        data[SUM_AT + 7],
    ]);
    if data[0..8] != MAGIC || fnv1a64(&data[..SUM_AT]) != sum {
        return false;
    }
    let mut expected = [0u8; BLOCK_SIZE];
    fill_block(seed, block, &mut expected);
    *data == expected
}
