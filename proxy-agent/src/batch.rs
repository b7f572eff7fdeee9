//! Batched map operations (`BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH`, Linux
//! 5.6+), which aya 0.14 does not expose for hash maps: one `bpf()` call
//! for many entries instead of one or two per entry. Used for the full
//! sync's writes and for reading the maps back; every caller falls back to
//! per-entry calls when the kernel refuses them.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the
    // buffers it points at outlive the call and have the sizes it states.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<BatchAttr>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Writes `keys[i] -> values[i]` in order. On failure: how many were
/// written, and the error of the next one.
pub fn update<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let n = (keys.len() - done).min(u32::MAX as usize);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        done += attr.count as usize;
        if let Err(e) = r {
            return Err((done, e));
        }
    }
    Ok(())
}

/// Deletes `keys`; an absent key is not an error.
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: (keys.len() - done).min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        done += attr.count as usize;
        match r {
            Ok(()) => {}
            // The kernel stops at the first absent key: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Every entry of a hash map.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut chunk = 4096usize;
    let mut out = Vec::new();
    // The hash map's cursor is a bucket index (u32); room for more.
    let mut cursor = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        // SAFETY: Pod types are plain data; all-zero is a valid value.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                // One bucket holds more entries than fit: a bigger chunk.
                chunk *= 4;
                continue;
            }
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        out.extend(keys.into_iter().zip(values).take(n));
        if r.is_err() {
            // ENOENT: the last entries came with it.
            return Ok(out);
        }
        cursor = next;
        first = false;
    }
}
