//! The send buffer of a connection: a ring of the host's bytes, from the
//! first unacknowledged on, that the host socket is read into directly.
//!
//! Reading into a buffer of the driver's and copying into the connection's
//! cost one copy of every byte toward the peer; here the driver reads into
//! the ring's free room ([`ByteRing::fill`]), and the only copy left is the
//! one into each segment, which retransmission needs anyway.
//!
//! The storage is a `Vec` whose capacity is the ring's size and whose
//! length is how far it has ever been written: room past the length is
//! filled through `Vec`'s [`BufMut`] (no zeroing, no unsafe code), and room
//! before it after the ring has wrapped, as a plain slice. It grows by
//! doubling toward the limit the caller names, and is freed when it empties,
//! so an idle connection holds no buffer.

use bytes::BufMut;
use bytes::buf::Limit;

/// The smallest storage a ring allocates.
const MIN_CAPACITY: usize = 4096;

/// A ring of bytes with room that can be filled in place.
#[derive(Debug, Default)]
pub(crate) struct ByteRing {
    /// `capacity()` is the ring's size; bytes `[..len()]` have been written.
    /// Wrapped, the bytes run from `head` to the end and on from 0.
    storage: Vec<u8>,
    head: usize,
    len: usize,
}

impl ByteRing {
    /// The number of bytes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are held.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether storage is allocated: exactly when bytes are held.
    #[cfg(test)]
    fn is_allocated(&self) -> bool {
        self.storage.capacity() > 0
    }

    /// The `len` bytes from `offset` on, as the parts before and after the
    /// ring's wrap (the second is empty unless the range spans it).
    ///
    /// # Panics
    /// If the range goes past the bytes held.
    pub(crate) fn range(&self, offset: usize, len: usize) -> (&[u8], &[u8]) {
        assert!(offset + len <= self.len, "range past the ring's bytes");
        let capacity = self.storage.capacity();
        let start = (self.head + offset) % capacity.max(1);
        let end = start + len;
        if end <= capacity {
            (&self.storage[start..end], &[])
        } else {
            (&self.storage[start..], &self.storage[..end - capacity])
        }
    }

    /// Drops the first `n` bytes (at most all of them); an emptied ring
    /// frees its storage.
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.len -= n;
        if self.len == 0 {
            self.clear();
        } else {
            self.head = (self.head + n) % self.storage.capacity();
        }
    }

    /// Drops every byte and frees the storage.
    pub(crate) fn clear(&mut self) {
        *self = ByteRing::default();
    }

    /// Appends up to `max` bytes in place: `write` gets the contiguous room
    /// at the ring's end, at most `max` bytes and at least one, and fills
    /// what it can from its start. The storage first grows, toward `limit`
    /// bytes in all, if it has fewer than `max` bytes free; an empty ring
    /// starts with [`MIN_CAPACITY`], so that a short reply does not take a
    /// whole buffer (a longer one grows it on the next fill). Returns how
    /// many bytes `write` appended, and what it returned; `None` (without
    /// calling `write`) if `max` is 0 or the ring already holds `limit`
    /// bytes.
    pub(crate) fn fill<R>(
        &mut self,
        max: usize,
        limit: usize,
        write: impl FnOnce(&mut dyn BufMut) -> R,
    ) -> Option<(usize, R)> {
        let max = max.min(limit.saturating_sub(self.len));
        if max == 0 {
            return None;
        }
        if self.storage.capacity() - self.len < max {
            let needed = if self.is_empty() {
                max.min(MIN_CAPACITY)
            } else {
                self.len + max
            };
            self.grow(needed, limit);
        }
        let capacity = self.storage.capacity();
        let tail = self.head + self.len;
        let (appended, result) = if tail < capacity {
            // Not wrapped: the room is past the written part. Whatever was
            // written there before, on an earlier lap, is stale.
            self.storage.truncate(tail);
            let mut room: Limit<&mut Vec<u8>> = (&mut self.storage).limit(max.min(capacity - tail));
            let result = write(&mut room);
            (self.storage.len() - tail, result)
        } else {
            // Wrapped (or ending exactly at the end): the room is between
            // the bytes' end, from 0 on, and their start.
            let start = tail - capacity;
            let end = self.head.min(start + max);
            let mut room: &mut [u8] = &mut self.storage[start..end];
            let before = room.len();
            let result = write(&mut room);
            (before - room.len(), result)
        };
        debug_assert_eq!(self.storage.capacity(), capacity, "the room never grows");
        self.len += appended;
        if self.len == 0 {
            // Nothing came: an idle connection keeps no buffer.
            self.clear();
        }
        Some((appended, result))
    }

    /// Appends as much of `data` as fits within `limit` bytes in all;
    /// returns how much did.
    pub(crate) fn extend_from_slice(&mut self, data: &[u8], limit: usize) -> usize {
        let mut done = 0;
        while done < data.len() {
            let Some((n, ())) = self.fill(data.len() - done, limit, |room| {
                let n = room.remaining_mut().min(data.len() - done);
                room.put_slice(&data[done..done + n]);
            }) else {
                break;
            };
            done += n;
        }
        done
    }

    /// Moves the bytes into storage of at least `needed` bytes: the next
    /// power of two, at least [`MIN_CAPACITY`], but no more than `limit`
    /// unless `needed` is.
    fn grow(&mut self, needed: usize, limit: usize) {
        let capacity = needed
            .next_power_of_two()
            .max(MIN_CAPACITY)
            .min(limit.max(needed));
        let mut storage = Vec::with_capacity(capacity);
        let (front, back) = self.range(0, self.len);
        storage.extend_from_slice(front);
        storage.extend_from_slice(back);
        self.storage = storage;
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    fn contents(ring: &ByteRing) -> Vec<u8> {
        let (front, back) = ring.range(0, ring.len());
        [front, back].concat()
    }

    #[test]
    fn an_empty_ring_holds_no_storage_and_a_drained_one_frees_it() {
        let mut ring = ByteRing::default();
        assert!(!ring.is_allocated());
        assert_eq!(ring.extend_from_slice(b"hello", 1 << 16), 5);
        assert!(ring.is_allocated());
        ring.consume(5);
        assert!(ring.is_empty());
        assert!(!ring.is_allocated());
    }

    #[test]
    fn fill_offers_no_more_than_max_or_the_limit() {
        let mut ring = ByteRing::default();
        let (n, offered) = ring
            .fill(100, 1 << 16, |room| room.remaining_mut())
            .unwrap();
        assert_eq!((n, offered), (0, 100));
        assert!(
            !ring.is_allocated(),
            "a fill that brought nothing keeps no storage"
        );
        ring.extend_from_slice(&[7; 90], 100);
        let (_, offered) = ring.fill(100, 100, |room| room.remaining_mut()).unwrap();
        assert_eq!(offered, 10);
        ring.extend_from_slice(&[7; 10], 100);
        assert!(ring.fill(100, 100, |_| ()).is_none(), "full at the limit");
        assert!(ring.fill(0, 1000, |_| ()).is_none());
    }

    #[test]
    fn an_empty_ring_starts_small_and_grows_while_it_fills() {
        let mut ring = ByteRing::default();
        let fill_all = |ring: &mut ByteRing| {
            ring.fill(64 * 1024, 1 << 20, |room| {
                let offered = room.remaining_mut();
                room.put_bytes(7, offered);
                offered
            })
        };
        assert_eq!(fill_all(&mut ring), Some((MIN_CAPACITY, MIN_CAPACITY)));
        let (n, _) = fill_all(&mut ring).unwrap();
        assert_eq!(n, 64 * 1024, "grown for the whole read");
        assert_eq!(ring.len(), MIN_CAPACITY + 64 * 1024);
    }

    #[test]
    fn room_across_the_wrap_is_offered_in_two_fills() {
        let mut ring = ByteRing::default();
        ring.extend_from_slice(&[1; 4000], MIN_CAPACITY);
        ring.consume(3000);
        // 96 bytes free at the end, then 3000 at the start.
        let (n, offered) = ring
            .fill(500, MIN_CAPACITY, |room| {
                let offered = room.remaining_mut();
                room.put_slice(&vec![2; offered]);
                offered
            })
            .unwrap();
        assert_eq!((n, offered), (96, 96));
        let (n, _) = ring
            .fill(500, MIN_CAPACITY, |room| room.put_slice(&[3; 404]))
            .unwrap();
        assert_eq!(n, 404);
        assert_eq!(ring.range(1000, 500), (&[2; 96][..], &[3; 404][..]));
        assert_eq!(
            ring.storage.capacity(),
            MIN_CAPACITY,
            "no growth was needed"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Append up to this many bytes through `fill`, writing this many.
        Fill(usize, usize),
        Consume(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1..20_000usize, 0..20_000usize).prop_map(|(max, n)| Op::Fill(max, n)),
            (0..20_000usize).prop_map(Op::Consume),
        ]
    }

    proptest! {
        /// The ring holds exactly what a plain queue would, in order, within
        /// its limit, whatever the fills, partial fills and drains.
        #[test]
        fn the_ring_keeps_every_byte_in_order(
            limit in 1..70_000usize,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let mut ring = ByteRing::default();
            let mut model = VecDeque::new();
            let mut next = 0u8;
            for op in ops {
                match op {
                    Op::Fill(max, n) => {
                        let outcome = ring.fill(max, limit, |room| {
                            let n = n.min(room.remaining_mut());
                            let bytes: Vec<u8> = (0..n)
                                .map(|_| { next = next.wrapping_add(1); next })
                                .collect();
                            room.put_slice(&bytes);
                            bytes
                        });
                        if let Some((appended, bytes)) = outcome {
                            prop_assert_eq!(appended, bytes.len());
                            prop_assert!(appended <= max);
                            model.extend(bytes);
                        } else {
                            prop_assert!(max.min(limit - model.len()) == 0);
                        }
                    }
                    Op::Consume(n) => {
                        ring.consume(n);
                        model.drain(..n.min(model.len()));
                    }
                }
                prop_assert!(ring.len() <= limit);
                prop_assert_eq!(ring.len(), model.len());
                prop_assert_eq!(contents(&ring), model.iter().copied().collect::<Vec<u8>>());
                prop_assert_eq!(ring.is_allocated(), !model.is_empty());
            }
        }
    }
}
