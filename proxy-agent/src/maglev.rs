//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Katran and
//! Cilium use it: the agent fills a lookup table of [`MAGLEV_M`] entries per
//! frontend; the datapath only hashes the flow and indexes the table. Each
//! backend's preference order depends on the backend's address alone, so the
//! same backend set always yields the same table (across agent restarts and
//! nodes), and removing one backend moves only the flows that were on it.
use proxy_common::{Backend, MAGLEV_M, MaglevTable};

/// FNV-1a over the backend's address, port and protocol, with a seed.
fn hash(b: &Backend, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in b.addr.iter().chain(b.port.to_be_bytes().iter()).chain(std::iter::once(&b.proto)) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche (splitmix64).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The table for `backends` (id, address) pairs. Empty input gives a table
/// of zeros (the datapath then falls back to its slots).
#[must_use]
pub fn table(backends: &[(u32, Backend)]) -> MaglevTable {
    let mut out = MaglevTable { backend_ids: [0; MAGLEV_M], _pad: 0 };
    if backends.is_empty() {
        return out;
    }
    let m = MAGLEV_M as u64;
    // Order by address so the table does not depend on id assignment.
    let mut sorted: Vec<&(u32, Backend)> = backends.iter().collect();
    sorted.sort_by_key(|(_, b)| (b.addr, b.port));
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(_, b)| (hash(b, 0x5eed_0001) % m, hash(b, 0x5eed_0002) % (m - 1) + 1))
        .collect();
    // Backend i's j-th preference is (offset + j * skip) % m, walked by
    // adding skip (no division per probe).
    let mut pos: Vec<u64> = perms.iter().map(|(offset, _)| *offset).collect();
    let step = |c: u64, skip: u64| if c + skip >= m { c + skip - m } else { c + skip };
    let mut filled = 0;
    let mut taken = vec![false; MAGLEV_M];
    while filled < MAGLEV_M {
        for (i, (_, skip)) in perms.iter().enumerate() {
            let mut c = pos[i];
            while taken[c as usize] {
                c = step(c, *skip);
            }
            taken[c as usize] = true;
            out.backend_ids[c as usize] = sorted[i].0;
            pos[i] = step(c, *skip);
            filled += 1;
            if filled == MAGLEV_M {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proxy_common::v4_mapped;

    use super::*;

    fn backend(i: u32) -> (u32, Backend) {
        (i, Backend { addr: v4_mapped([10, 1, (i >> 8) as u8, i as u8]), port: 8080, proto: 6, flags: 0 })
    }

    fn shares(t: &MaglevTable) -> BTreeMap<u32, usize> {
        let mut m = BTreeMap::new();
        for id in t.backend_ids {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    #[test]
    fn every_entry_is_filled_and_load_is_even() {
        for n in [1u32, 2, 3, 10, 50] {
            let backends: Vec<_> = (1..=n).map(backend).collect();
            let t = table(&backends);
            let s = shares(&t);
            assert!(!s.contains_key(&0), "no empty entry with {n} backends");
            assert_eq!(s.len(), n as usize);
            let ideal = MAGLEV_M as f64 / f64::from(n);
            for (id, c) in &s {
                let dev = (*c as f64 - ideal).abs() / ideal;
                assert!(dev < 0.15, "backend {id} has {c} of {MAGLEV_M} entries with {n} backends (ideal {ideal:.0})");
            }
        }
    }

    #[test]
    fn same_set_same_table_whatever_the_ids_order() {
        let a: Vec<_> = (1..=5).map(backend).collect();
        let mut b = a.clone();
        b.reverse();
        assert_eq!(table(&a), table(&b));
    }

    #[test]
    fn removing_a_backend_moves_only_its_entries_mostly() {
        let all: Vec<_> = (1..=10).map(backend).collect();
        let before = table(&all);
        let after = table(&all[1..]);
        let moved = (0..MAGLEV_M)
            .filter(|i| before.backend_ids[*i] != 1 && before.backend_ids[*i] != after.backend_ids[*i])
            .count();
        // Maglev's bound is small, not zero: under 5% of the other entries move.
        assert!(moved < MAGLEV_M / 20, "{moved} entries of surviving backends moved");
        assert!(after.backend_ids.iter().all(|id| *id != 1));
    }
}

#[cfg(test)]
mod same_as_reference {
    use proxy_common::v4_mapped;

    use super::*;

    /// The table as first written (a division per probe): the faster walk
    /// must give the very same tables, or an upgraded agent would move
    /// flows.
    fn reference(backends: &[(u32, Backend)]) -> MaglevTable {
        let mut out = MaglevTable { backend_ids: [0; MAGLEV_M], _pad: 0 };
        let m = MAGLEV_M as u64;
        let mut sorted: Vec<&(u32, Backend)> = backends.iter().collect();
        sorted.sort_by_key(|(_, b)| (b.addr, b.port));
        let perms: Vec<(u64, u64)> =
            sorted.iter().map(|(_, b)| (hash(b, 0x5eed_0001) % m, hash(b, 0x5eed_0002) % (m - 1) + 1)).collect();
        let mut next = vec![0u64; sorted.len()];
        let mut filled = 0;
        let mut taken = vec![false; MAGLEV_M];
        while filled < MAGLEV_M {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while taken[c as usize] {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                taken[c as usize] = true;
                out.backend_ids[c as usize] = sorted[i].0;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_M {
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn tables_equal_the_reference() {
        for n in [1u32, 2, 3, 7, 10, 50, 300] {
            let set: Vec<(u32, Backend)> = (0..n)
                .map(|i| (i + 1, Backend { addr: v4_mapped([10, (i >> 8) as u8, i as u8, 7]), port: 8080 + (i % 3) as u16, proto: 6, flags: 0 }))
                .collect();
            assert!(table(&set).backend_ids == reference(&set).backend_ids, "{n} backends");
        }
    }
}
