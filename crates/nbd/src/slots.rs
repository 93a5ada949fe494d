//! Connection slots per client address, on top of the server-wide count.
//!
//! Without them one address could open every connection a listener allows
//! ([`crate::Limits::connections_max`] here; the replication listener uses the
//! same table) and leave every other client waiting in the listen backlog. An
//! IPv6 client is counted by its /64, the block one host or one customer
//! usually gets, since a single machine can pick any address inside it.
//! The table holds one entry per address with a connection open, so it is
//! bounded by the server-wide count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

/// Connections held per address key.
#[derive(Debug)]
pub struct AddressSlots {
    per_address_max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's slot for its address; freed when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    key: IpAddr,
}

impl AddressSlots {
    /// A table that lets each address key hold `per_address_max` slots.
    pub fn new(per_address_max: usize) -> Arc<Self> {
        Arc::new(Self {
            per_address_max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when its address already
    /// holds every slot it may.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut held = self.lock();
        let count = held.entry(key).or_insert(0);
        if *count >= self.per_address_max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: Arc::clone(self),
            key,
        })
    }

    /// Connections open from the address key of `ip`.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        self.lock().get(&address_key(ip)).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map stays consistent across a panic elsewhere: every update is one step.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// The key an address is counted under: IPv4 (including IPv4-mapped IPv6)
/// as itself, other IPv6 addresses by their /64.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_at_most_its_share_and_gets_it_back() {
        let slots = AddressSlots::new(2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(a).unwrap();
        assert!(
            slots.try_acquire(a).is_none(),
            "a third slot for one address"
        );
        assert!(
            slots.try_acquire(b).is_some(),
            "another address was refused"
        );
        drop(first);
        assert_eq!(slots.held(a), 1);
        assert!(slots.try_acquire(a).is_some());
    }

    #[test]
    fn freed_addresses_leave_no_entry() {
        let slots = AddressSlots::new(1);
        let slot = slots.try_acquire("10.0.0.1".parse().unwrap()).unwrap();
        drop(slot);
        assert!(slots.lock().is_empty());
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_slots_and_mapped_ipv4_is_ipv4() {
        let slots = AddressSlots::new(1);
        let _one = slots.try_acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert!(
            slots
                .try_acquire("2001:db8::ffff:1234".parse().unwrap())
                .is_none(),
            "another address of the same /64 got a slot of its own"
        );
        assert!(
            slots
                .try_acquire("2001:db8:0:1::1".parse().unwrap())
                .is_some()
        );
        let _v4 = slots.try_acquire("192.0.2.7".parse().unwrap()).unwrap();
        assert!(
            slots
                .try_acquire("::ffff:192.0.2.7".parse().unwrap())
                .is_none()
        );
    }
}
