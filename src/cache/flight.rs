//! Single flight: concurrent misses of one key share one fill. The first caller runs its fill;
//! the others wait for its result (a clone). A caller whose fill is abandoned (its request timed
//! out or went away) hands the turn to a waiting caller, which runs its own fill. Knows keys and
//! values only.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use super::key::Digest;

struct Flight<V> {
    cell: tokio::sync::OnceCell<V>,
}

pub struct Flights<V> {
    map: Mutex<HashMap<Digest, Arc<Flight<V>>>>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Flights { map: Mutex::new(HashMap::new()) }
    }
}

/// Removes a finished flight from the map when its last participant leaves, however it leaves
/// (a result kept in the map would be served after its entry expired).
struct Leave<'a, V> {
    flights: &'a Flights<V>,
    key: Digest,
    flight: Arc<Flight<V>>,
}

impl<V> Drop for Leave<'_, V> {
    fn drop(&mut self) {
        if self.flight.cell.initialized() {
            let mut map = self.flights.map.lock().expect("flights lock");
            if map.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
                map.remove(&self.key);
            }
        }
    }
}

impl<V: Clone> Flights<V> {
    /// Run `fill` for `key`, or wait for the fill already running; `(value, merged)` where
    /// `merged` says another caller's fill produced it.
    pub async fn run<F: Future<Output = V>>(&self, key: Digest, fill: F) -> (V, bool) {
        let flight = self
            .map
            .lock()
            .expect("flights lock")
            .entry(key)
            .or_insert_with(|| Arc::new(Flight { cell: tokio::sync::OnceCell::new() }))
            .clone();
        let _leave = Leave { flights: self, key, flight: flight.clone() };
        let mut ran = false;
        let v = flight
            .cell
            .get_or_init(|| {
                ran = true;
                fill
            })
            .await
            .clone();
        (v, !ran)
    }

    /// Is a fill for `key` running (a stale hit starts a refresh only if none is)?
    pub fn running(&self, key: &Digest) -> bool {
        self.map.lock().expect("flights lock").get(key).is_some_and(|f| !f.cell.initialized())
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("flights lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_fill() {
        let flights: Arc<Flights<u64>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (f, runs) = (flights.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                f.run(Digest([7; 32]), async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    42
                })
                .await
            }));
        }
        let mut merged = 0;
        for t in tasks {
            let (v, m) = t.await.unwrap();
            assert_eq!(v, 42);
            merged += usize::from(m);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(merged, 49);
        assert!(flights.is_empty(), "finished flights leave the map");
    }

    #[tokio::test]
    async fn an_abandoned_fill_hands_over() {
        let flights: Arc<Flights<u64>> = Arc::default();
        let f = flights.clone();
        let first = tokio::spawn(async move { f.run(Digest([1; 32]), std::future::pending::<u64>()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(flights.running(&Digest([1; 32])));
        let f = flights.clone();
        let second = tokio::spawn(async move { f.run(Digest([1; 32]), async { 5 }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let (v, merged) = second.await.unwrap();
        assert_eq!((v, merged), (5, false));
        assert!(flights.is_empty());
    }
}
