//! The batched map operations on a real BPF hash map (root): every entry
//! written in one call is read back in chunks, absent keys do not stop a
//! batched delete, and a full map reports how far the batch got.
use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

use proxy_agent::batch;

/// A BPF hash map u32 -> u64 created with `bpf(BPF_MAP_CREATE)`, without
/// preallocation, as the agent's maps are.
fn hash_map(max_entries: u32) -> OwnedFd {
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let attr = CreateAttr { map_type: BPF_MAP_TYPE_HASH, key_size: 4, value_size: 8, max_entries, map_flags: BPF_F_NO_PREALLOC };
    // SAFETY: a valid bpf_attr prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0 as libc::c_long, &raw const attr, std::mem::size_of::<CreateAttr>()) };
    assert!(fd >= 0, "BPF_MAP_CREATE failed (run as root): {}", std::io::Error::last_os_error());
    // SAFETY: a new fd we own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

#[test]
fn batched_writes_reads_and_deletes_on_a_real_hash_map() {
    let map = hash_map(20_000);
    let keys: Vec<u32> = (1..=10_000).collect();
    let values: Vec<u64> = keys.iter().map(|k| u64::from(*k) * 3).collect();
    batch::update(map.as_fd(), &keys, &values).expect("one batch of 10,000");
    let mut got: Vec<(u32, u64)> = batch::lookup_all(map.as_fd()).unwrap();
    got.sort_unstable();
    assert_eq!(got.len(), 10_000, "read back in chunks of 4,096");
    assert!(got.iter().all(|(k, v)| *v == u64::from(*k) * 3));
    // Every other key, and some that were never there.
    let del: Vec<u32> = (1..=10_000).step_by(2).chain(50_000..50_010).collect();
    batch::delete(map.as_fd(), &del).expect("absent keys are skipped");
    let left: Vec<(u32, u64)> = batch::lookup_all(map.as_fd()).unwrap();
    assert_eq!(left.len(), 5_000);
    assert!(left.iter().all(|(k, _)| k % 2 == 0));
    // Past capacity: the batch stops where the map is full.
    let more: Vec<u32> = (100_000..120_000).collect();
    let vals = vec![7u64; more.len()];
    let (done, err) = batch::update(map.as_fd(), &more, &vals).expect_err("the map fills up");
    assert_eq!(done, 15_000, "written until full");
    assert_eq!(err.raw_os_error(), Some(libc::E2BIG), "{err}");
    assert_eq!(batch::lookup_all::<u32, u64>(map.as_fd()).unwrap().len(), 20_000);
}
