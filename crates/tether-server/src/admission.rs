//! Fair admission before authentication: per-key slot counts (a peer's source address, an
//! agent identity) so one host or one certificate cannot take every pre-auth slot, and the
//! short wait for a new connection's first byte.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

/// The key a peer address is counted under: an IPv4 address (IPv4-mapped IPv6 included) as
/// itself, an IPv6 address by its /64, the block one host usually controls whole.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// Counts the slots held per key, each key at most `per_key` at once. The table holds only
/// keys with a slot, so it never has more entries than slots are held (which the caller's
/// global bound limits).
#[derive(Debug)]
pub(crate) struct SlotTable<K> {
    per_key: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> SlotTable<K> {
    pub(crate) fn new(per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            per_key,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `key`, or `None` when `key` already holds `per_key` of them.
    pub(crate) fn try_take(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.per_key {
            return None;
        }
        *count += 1;
        Some(Slot {
            table: self.clone(),
            key: Some(key),
        })
    }

    /// Slots `key` holds now.
    #[cfg(test)]
    fn held(&self, key: &K) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(key).copied().unwrap_or(0)
    }

    fn release(&self, key: &K) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                held.remove(key);
            }
        }
    }
}

/// One held slot; dropping it frees the slot.
pub(crate) struct Slot<K: Eq + Hash + Clone> {
    table: Arc<SlotTable<K>>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.table.release(&key);
        }
    }
}

/// Waits until `tcp` has a byte to read (or has ended), at most `limit`. False when nothing
/// arrived in time: a client that means to talk (a TLS ClientHello, an HTTP request, a SOCKS
/// greeting) speaks at once, a silent socket only holds a slot.
pub(crate) async fn first_byte(tcp: &TcpStream, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, tcp.readable()).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_per_key_and_freed_on_drop() {
        let table = SlotTable::new(2);
        let a1 = table.try_take("a").expect("first slot");
        let _a2 = table.try_take("a").expect("second slot");
        assert!(table.try_take("a").is_none(), "third slot of a refused");
        let _b = table.try_take("b").expect("b is counted apart");
        drop(a1);
        assert_eq!(table.held(&"a"), 1);
        let _a3 = table.try_take("a").expect("a slot freed by the drop");
    }

    #[test]
    fn empty_keys_leave_the_table() {
        let table = SlotTable::new(1);
        drop(table.try_take(7u32));
        assert!(
            table
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
    }

    #[test]
    fn sources_group_ipv6_by_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| source_key(s.parse().expect("test address"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
    }
}
