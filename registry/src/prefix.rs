//! Prefix allocation: a buddy allocator over the network prefix.
//!
//! The free space is a set of aligned blocks. Allocating a prefix of length
//! `L` takes the most specific free block no longer than `L` (the lowest one
//! among equals), splits it down to `L` keeping the lower half each time, and
//! leaves the upper halves free. Releasing a block merges it with its buddy
//! as long as the buddy is free, so freed space merges back. Pure logic: the
//! database stores the free set and runs this in one transaction.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use crate::error::{Error, Result};

/// An aligned block of the address space: `addr/len`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    /// The block's first address.
    pub addr: u128,
    /// Its prefix length.
    pub len: u8,
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Block {
    /// A block from a network; the host bits must be zero.
    pub fn new(addr: u128, len: u8) -> Result<Self> {
        if len > 128 {
            return Err(Error::Invalid(format!("prefix length {len} exceeds 128")));
        }
        if addr & !mask(len) != 0 {
            return Err(Error::Invalid(format!(
                "{}/{len} has host bits set",
                Ipv6Addr::from(addr)
            )));
        }
        Ok(Self { addr, len })
    }

    /// From an `Ipv6Net` (which must be in canonical form).
    pub fn from_net(net: Ipv6Net) -> Result<Self> {
        Self::new(u128::from(net.addr()), net.prefix_len())
    }

    /// As an `Ipv6Net`.
    pub fn net(&self) -> Ipv6Net {
        Ipv6Net::new(Ipv6Addr::from(self.addr), self.len).unwrap_or_default()
    }

    /// Whether `other` lies inside this block.
    pub fn contains(&self, other: &Block) -> bool {
        other.len >= self.len && other.addr & mask(self.len) == self.addr
    }

    /// Whether the two blocks share any address.
    pub fn overlaps(&self, other: &Block) -> bool {
        self.contains(other) || other.contains(self)
    }

    fn half_bit(&self) -> u128 {
        1u128 << (127 - u32::from(self.len))
    }

    fn buddy(&self) -> Block {
        Block {
            addr: self.addr ^ (1u128 << (128 - u32::from(self.len))),
            len: self.len,
        }
    }

    fn parent(&self) -> Block {
        let len = self.len - 1;
        Block {
            addr: self.addr & mask(len),
            len,
        }
    }

    /// Number of addresses, as a power of two.
    pub fn size_log2(&self) -> u32 {
        128 - u32::from(self.len)
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv6Addr::from(self.addr), self.len)
    }
}

/// The free space of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocator {
    network: Block,
    free: BTreeSet<Block>,
}

impl Allocator {
    /// A network with all of its space free.
    pub fn new(network: Block) -> Self {
        Self {
            network,
            free: BTreeSet::from([network]),
        }
    }

    /// A network with the given free blocks (as stored); each must lie in the
    /// network and none may overlap another.
    pub fn from_free(network: Block, free: impl IntoIterator<Item = Block>) -> Result<Self> {
        let mut set = BTreeSet::new();
        for b in free {
            if !network.contains(&b) {
                return Err(Error::Corrupt(format!("free block {b} outside {network}")));
            }
            set.insert(b);
        }
        let list: Vec<&Block> = set.iter().collect();
        for pair in list.windows(2) {
            // Sorted by address: an overlap shows up between neighbours.
            if pair[0].overlaps(pair[1]) {
                return Err(Error::Corrupt(format!(
                    "free blocks {} and {} overlap",
                    pair[0], pair[1]
                )));
            }
        }
        Ok(Self { network, free: set })
    }

    /// The network.
    pub fn network(&self) -> Block {
        self.network
    }

    /// The free blocks, in address order.
    pub fn free_blocks(&self) -> impl Iterator<Item = &Block> {
        self.free.iter()
    }

    /// Takes a block of length `len`: the most specific free block no longer
    /// than `len`, lowest first, split down to `len`.
    pub fn allocate(&mut self, len: u8) -> Result<Block> {
        if len < self.network.len || len > 128 {
            return Err(Error::Invalid(format!(
                "prefix length {len} outside {}..=128",
                self.network.len
            )));
        }
        let best = self
            .free
            .iter()
            .filter(|b| b.len <= len)
            .max_by(|a, b| a.len.cmp(&b.len).then(b.addr.cmp(&a.addr)))
            .copied()
            .ok_or_else(|| Error::Exhausted(format!("no free /{len} left in {}", self.network)))?;
        self.free.remove(&best);
        let mut block = best;
        while block.len < len {
            let upper = Block {
                addr: block.addr | block.half_bit(),
                len: block.len + 1,
            };
            self.free.insert(upper);
            block = Block {
                addr: block.addr,
                len: block.len + 1,
            };
        }
        Ok(block)
    }

    /// Takes exactly `block`, which must lie inside a free block.
    pub fn take(&mut self, block: Block) -> Result<()> {
        let outer = self
            .free
            .iter()
            .find(|f| f.contains(&block))
            .copied()
            .ok_or_else(|| Error::Invalid(format!("{block} is not free")))?;
        self.free.remove(&outer);
        let mut cur = outer;
        while cur.len < block.len {
            let lower = Block {
                addr: cur.addr,
                len: cur.len + 1,
            };
            let upper = Block {
                addr: cur.addr | cur.half_bit(),
                len: cur.len + 1,
            };
            let (keep, give) = if lower.contains(&block) {
                (lower, upper)
            } else {
                (upper, lower)
            };
            self.free.insert(give);
            cur = keep;
        }
        Ok(())
    }

    /// Returns `block` to the free space, merging free buddies.
    pub fn release(&mut self, block: Block) -> Result<()> {
        if !self.network.contains(&block) {
            return Err(Error::Invalid(format!(
                "{block} is outside {}",
                self.network
            )));
        }
        if self.free.iter().any(|f| f.overlaps(&block)) {
            return Err(Error::Invalid(format!("{block} is already (partly) free")));
        }
        let mut cur = block;
        while cur.len > self.network.len && self.free.remove(&cur.buddy()) {
            cur = cur.parent();
        }
        self.free.insert(cur);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net48() -> Block {
        Block {
            addr: 0xfd5e_02a1_0077u128 << 80,
            len: 48,
        }
    }

    #[test]
    fn allocates_in_ascending_order() -> Result<()> {
        let mut a = Allocator::new(net48());
        let b0 = a.allocate(64)?;
        let b1 = a.allocate(64)?;
        let b2 = a.allocate(64)?;
        assert_eq!(b0.to_string(), "fd5e:2a1:77::/64");
        assert_eq!(b1.to_string(), "fd5e:2a1:77:1::/64");
        assert_eq!(b2.to_string(), "fd5e:2a1:77:2::/64");
        Ok(())
    }

    #[test]
    fn variable_lengths_use_the_most_specific_block() -> Result<()> {
        let mut a = Allocator::new(net48());
        let b0 = a.allocate(64)?; // leaves :1::/64, :2::/63, :4::/62 ...
        let big = a.allocate(62)?;
        assert_eq!(big.to_string(), "fd5e:2a1:77:4::/62");
        let small = a.allocate(64)?;
        assert_eq!(small.to_string(), "fd5e:2a1:77:1::/64");
        a.release(b0)?;
        a.release(small)?;
        a.release(big)?;
        assert_eq!(a, Allocator::new(net48()));
        Ok(())
    }

    #[test]
    fn exhaustion_is_an_error() -> Result<()> {
        let mut a = Allocator::new(Block::new(0xfd00u128 << 112, 62)?);
        for _ in 0..4 {
            a.allocate(64)?;
        }
        assert!(matches!(a.allocate(64), Err(Error::Exhausted(_))));
        assert!(matches!(a.allocate(40), Err(Error::Invalid(_))));
        Ok(())
    }

    #[test]
    fn take_reserves_a_given_block() -> Result<()> {
        let mut a = Allocator::new(net48());
        let want = Block::new((0xfd5e_02a1_0077u128 << 80) | (5u128 << 64), 64)?;
        a.take(want)?;
        assert!(a.take(want).is_err());
        // The leftover /64 beside it goes first (most specific block).
        assert_eq!(a.allocate(64)?.to_string(), "fd5e:2a1:77:4::/64");
        for _ in 0..100 {
            assert_ne!(a.allocate(64)?, want);
        }
        Ok(())
    }

    #[test]
    fn release_refuses_what_is_free_or_outside() -> Result<()> {
        let mut a = Allocator::new(net48());
        let b = a.allocate(64)?;
        a.release(b)?;
        assert!(a.release(b).is_err());
        assert!(a.release(Block::new(0xfd00u128 << 112, 64)?).is_err());
        Ok(())
    }

    #[test]
    fn corrupt_free_sets_are_refused() -> Result<()> {
        let n = net48();
        let inner = Block::new(n.addr, 64)?;
        assert!(Allocator::from_free(n, [n, inner]).is_err());
        assert!(Allocator::from_free(n, [Block::new(0, 64)?]).is_err());
        Ok(())
    }

    proptest! {
        /// Allocations never overlap each other or the free space, the two
        /// always cover the whole network, and releasing everything merges
        /// back to one free block.
        #[test]
        fn never_overlaps_and_merges_back(ops in proptest::collection::vec((any::<bool>(), 52u8..=66, any::<usize>()), 1..200)) {
            let net = Block { addr: 0xfd00u128 << 112, len: 50 };
            let mut a = Allocator::new(net);
            let mut taken: Vec<Block> = Vec::new();
            for (alloc, len, pick) in ops {
                if alloc || taken.is_empty() {
                    if let Ok(b) = a.allocate(len) {
                        prop_assert_eq!(b.len, len);
                        prop_assert!(net.contains(&b));
                        for t in &taken {
                            prop_assert!(!t.overlaps(&b), "{} overlaps {}", t, b);
                        }
                        for f in a.free_blocks() {
                            prop_assert!(!f.overlaps(&b));
                        }
                        taken.push(b);
                    }
                } else {
                    let b = taken.swap_remove(pick % taken.len());
                    a.release(b)?;
                }
                // Free + taken cover the network exactly.
                let total: f64 = a.free_blocks().chain(taken.iter())
                    .map(|b| 2f64.powi(b.size_log2() as i32)).sum();
                prop_assert_eq!(total, 2f64.powi(net.size_log2() as i32));
                // No two free buddies are left unmerged.
                for f in a.free_blocks() {
                    if f.len > net.len {
                        prop_assert!(!a.free.contains(&f.buddy()), "unmerged buddies at {}", f);
                    }
                }
            }
            for b in taken {
                a.release(b)?;
            }
            prop_assert_eq!(a, Allocator::new(net));
        }
    }
}
