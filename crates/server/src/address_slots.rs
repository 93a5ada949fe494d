//! Per-address connection slots: one peer address may hold at most
//! `--connections-per-address` of the listener's `--connections-max` slots, so
//! that one address cannot take them all before any TLS work is done.
//!
//! IPv4 addresses count one by one; IPv6 addresses count by their /64 prefix
//! (one host usually holds a whole /64), and an IPv4-mapped IPv6 address counts
//! as its IPv4 address. The table holds one entry per address with a slot, so
//! it never holds more entries than connections are open.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The slots each address holds.
#[derive(Debug)]
pub(crate) struct AddressSlots {
    per_address_max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of one address; given back when dropped.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    slots: Arc<AddressSlots>,
    key: IpAddr,
}

/// The address a peer's slots are counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

impl AddressSlots {
    pub(crate) fn new(per_address_max: usize) -> Arc<Self> {
        Arc::new(Self {
            per_address_max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` if its address holds all it may.
    pub(crate) fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = key(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(key).or_insert(0);
        if *count >= self.per_address_max {
            if *count == 0 {
                held.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: Arc::clone(self),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_slots_back() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = slots.try_take(a).unwrap();
        let _second = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
        // The IPv4-mapped form is the same address.
        assert!(
            slots
                .try_take("::ffff:127.0.0.1".parse().unwrap())
                .is_none()
        );
        let _other = slots.try_take(b).unwrap();
        drop(first);
        let _again = slots.try_take(a).unwrap();
        assert!(slots.try_take(a).is_none());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let slots = AddressSlots::new(1);
        let _one = slots.try_take("2001:db8::1".parse().unwrap()).unwrap();
        assert!(
            slots
                .try_take("2001:db8::ffff:2".parse().unwrap())
                .is_none()
        );
        assert!(slots.try_take("2001:db8:0:1::1".parse().unwrap()).is_some());
    }

    #[test]
    fn released_addresses_leave_no_entry() {
        let slots = AddressSlots::new(1);
        for i in 0..100u8 {
            drop(slots.try_take(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert!(slots.held.lock().unwrap().is_empty());
    }
}
