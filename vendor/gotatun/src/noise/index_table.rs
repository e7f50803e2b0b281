// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.
//
// This file incorporates work covered by the following copyright and
// permission notice:
//
//   Copyright (c) Mullvad VPN AB. All rights reserved.
//
// SPDX-License-Identifier: MPL-2.0

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A table of unique session IDs.
///
/// All peers share a single `IndexTable` to ensure no two sessions use the same index.
/// Indices are random `u32`s and freed automatically when the returned [`Index`] is dropped.
///
/// wgslirpy patch: a handle may be confined to a [`Lane`] ([`IndexTable::in_lane`]): the
/// indices it hands out then have a low byte in that lane's class, so that a socket group can
/// steer every packet addressed to them to the same socket (see [`Lane`]).
#[derive(Clone)]
pub struct IndexTable<Rng = StdRng> {
    shared: Arc<Mutex<(Rng, HashSet<u32>)>>,
    lane: Lane,
}

/// wgslirpy patch: one of `count` receive lanes. An index is in lane `index` when its low byte
/// (the first byte on the wire, where messages carry it little-endian) is `index` modulo
/// `count`. A receiver index is chosen by the peer that receives, so a receiver that keeps each
/// peer's indices in one lane can steer all of that peer's packets to one socket by their
/// first index byte alone, whatever endpoint they come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lane {
    index: u8,
    count: u8,
}

impl Lane {
    /// Any index: the one lane of one.
    pub const ANY: Lane = Lane { index: 0, count: 1 };

    /// Lane `index` of `count` (`index` is taken modulo `count`; a `count` of 0 is 1).
    pub fn new(index: usize, count: usize) -> Lane {
        let count = count.clamp(1, 255);
        Lane {
            index: (index % count) as u8,
            count: count as u8,
        }
    }

    /// The lane of `index`, of `count` lanes.
    pub fn of(index: u32, count: usize) -> Lane {
        Lane::new(usize::from(index as u8), count)
    }

    /// `index` with its low byte moved into this lane's class, the rest kept.
    fn confine(self, index: u32) -> u32 {
        let low = index & 0xff;
        let (count, lane) = (u32::from(self.count), u32::from(self.index));
        let mut confined = low - low % count + lane;
        if confined > 0xff {
            // Past the byte: the class's member before it is in range.
            confined -= count;
        }
        (index & !0xff) | confined
    }
}

/// A 32-bit index that locally represents the other peer, analogous to IPsec’s “SPI”.
///
/// A session index is derived from [`IndexTable::new_index`], and the session index is
/// automatically freed from its [`IndexTable`] on drop.
///
/// See section 5.4 of the [whitepaper](https://www.wireguard.com/papers/wireguard.pdf).
pub struct Index<Rng = StdRng> {
    value: u32,
    table: IndexTable<Rng>,
}

impl<Rng> IndexTable<Rng>
where
    Rng: RngCore,
{
    /// Generate a random `u32` not already in the table.
    ///
    /// The returned [`Index`] keeps the entry reserved; dropping it frees the slot.
    pub fn new_index(&self) -> Index<Rng> {
        let mut g = self.shared.lock().unwrap();
        // Find a free index by guessing. See the rationale here:
        // https://github.com/torvalds/linux/blob/e81dd54f62c753dd423d1a9b62481a1c599fb975/drivers/net/wireguard/peerlookup.c#L95-L117
        // Even if the table contained 2^31 entries, you'd usually only need 1-2 attempts.
        loop {
            let idx = self.lane.confine(Self::next_id(&mut g.0));
            if g.1.insert(idx) {
                return Index {
                    value: idx,
                    table: self.in_lane(self.lane),
                };
            }
        }
    }

    /// Naively generate the next session ID. This index is not guaranteed to be locally unique.
    pub(crate) fn next_id(rng: &mut Rng) -> u32 {
        rng.next_u32()
    }

    /// Create a new [`IndexTable`] using the given [`RngCore`].
    pub fn from_rng(rng: Rng) -> Self {
        IndexTable {
            shared: Arc::new(Mutex::new((rng, HashSet::new()))),
            lane: Lane::ANY,
        }
    }

    /// Check if an index is already in the table.
    pub fn in_use(&self, value: u32) -> bool {
        let g = self.shared.lock().unwrap();
        g.1.contains(&value)
    }
}

impl<Rng> IndexTable<Rng> {
    /// wgslirpy patch: a handle on the same table whose new indices are all in `lane`.
    pub fn in_lane(&self, lane: Lane) -> Self {
        IndexTable {
            shared: Arc::clone(&self.shared),
            lane,
        }
    }
}

impl<Rng> IndexTable<Rng>
where
    Rng: SeedableRng + RngCore,
{
    /// Create a new [`IndexTable`] seeded using [`SeedableRng::from_os_rng`].
    pub fn from_os_rng() -> Self {
        Self::from_rng(Rng::from_os_rng())
    }
}

impl<Rng> IndexTable<Rng> {
    /// Remove an index from the table, making it available for reuse.
    fn free_index(&self, index: u32) {
        let mut g = self.shared.lock().unwrap();
        g.1.remove(&index);
    }
}

impl Index {
    /// The raw `u32` index value.
    pub fn value(&self) -> u32 {
        self.value
    }
}

impl<Rng> Drop for Index<Rng> {
    fn drop(&mut self) {
        self.table.free_index(self.value);
    }
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl std::fmt::Display for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct ModCounter {
        dividend: u32,
        divisor: u32,
    }

    impl RngCore for ModCounter {
        fn next_u32(&mut self) -> u32 {
            let v = self.dividend % self.divisor;
            self.dividend += 1;
            v
        }

        fn next_u64(&mut self) -> u64 {
            unimplemented!()
        }

        fn fill_bytes(&mut self, _: &mut [u8]) {
            unimplemented!()
        }
    }

    /// Test that indices are freed when dropped.
    #[test]
    fn test_reuse_on_drop() {
        let table = IndexTable::from_rng(ModCounter {
            dividend: 0,
            divisor: 3,
        });

        let a = table.new_index();
        let b = table.new_index();
        let c = table.new_index();

        assert_eq!(a.value, 0);
        assert_eq!(b.value, 1);
        assert_eq!(c.value, 2);

        // 1 should be the only free value
        let recycled = b.value;
        drop(b);
        for _ in 0..10 {
            assert_eq!(table.new_index().value, recycled);
        }
    }

    /// wgslirpy patch: every index a lane's handle hands out is in that lane, and unique
    /// across the lanes of one table.
    #[test]
    fn lanes_confine_the_low_byte() {
        let table = IndexTable::from_rng(StdRng::seed_from_u64(7));
        for count in 1..=7 {
            let mut seen = HashSet::new();
            let mut kept = Vec::new();
            for lane in 0..count {
                let handle = table.in_lane(Lane::new(lane, count));
                for _ in 0..200 {
                    let index = handle.new_index();
                    assert_eq!(Lane::of(index.value(), count), Lane::new(lane, count));
                    assert!(seen.insert(index.value()));
                    kept.push(index);
                }
            }
        }
        for low in [0u32, 1, 250, 251, 252, 253, 254, 255] {
            for count in 1..=7 {
                for lane in 0..count {
                    let confined = Lane::new(lane, count).confine(0xabcd_ef00 | low);
                    assert_eq!(confined & !0xff, 0xabcd_ef00);
                    assert_eq!((confined & 0xff) as usize % count, lane);
                }
            }
        }
    }
}
