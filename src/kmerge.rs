//! k-way merge of per-shard results that are each already sorted: the one merge behind SQL area
//! reads (`merge.order_by`) and document area finds (`sort`). Pure; knows no rows or documents.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Merge `parts` (each sorted by `cmp`) into one sorted list of at most `limit` items. Ties go
/// to the lower part index, so equal keys keep shard order.
pub fn merge_sorted<T, F: Fn(&T, &T) -> Ordering>(parts: Vec<Vec<T>>, limit: usize, cmp: F) -> Vec<T> {
    struct Head<'a, T, F> {
        item: T,
        part: usize,
        cmp: &'a F,
    }
    impl<T, F: Fn(&T, &T) -> Ordering> PartialEq for Head<'_, T, F> {
        fn eq(&self, o: &Self) -> bool {
            self.cmp(o) == Ordering::Equal
        }
    }
    impl<T, F: Fn(&T, &T) -> Ordering> Eq for Head<'_, T, F> {}
    impl<T, F: Fn(&T, &T) -> Ordering> PartialOrd for Head<'_, T, F> {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    impl<T, F: Fn(&T, &T) -> Ordering> Ord for Head<'_, T, F> {
        // BinaryHeap is a max-heap: reversed so the smallest item (then lowest part) pops first.
        fn cmp(&self, o: &Self) -> Ordering {
            (self.cmp)(&o.item, &self.item).then(o.part.cmp(&self.part))
        }
    }
    let total: usize = parts.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = parts.into_iter().map(Vec::into_iter).collect();
    let mut heap = BinaryHeap::with_capacity(iters.len());
    for (part, it) in iters.iter_mut().enumerate() {
        if let Some(item) = it.next() {
            heap.push(Head { item, part, cmp: &cmp });
        }
    }
    let mut out = Vec::with_capacity(total.min(limit));
    while out.len() < limit {
        let Some(Head { item, part, .. }) = heap.pop() else { break };
        out.push(item);
        if let Some(next) = iters[part].next() {
            heap.push(Head { item: next, part, cmp: &cmp });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_sorted;

    #[test]
    fn merges_sorted_parts_with_ties_in_part_order_and_limit() {
        let parts = vec![vec![(1, 'a'), (4, 'a'), (4, 'a')], vec![], vec![(2, 'c'), (4, 'c')], vec![(0, 'd')]];
        let all = merge_sorted(parts.clone(), usize::MAX, |x, y| x.0.cmp(&y.0));
        assert_eq!(all, [(0, 'd'), (1, 'a'), (2, 'c'), (4, 'a'), (4, 'a'), (4, 'c')]);
        assert_eq!(merge_sorted(parts, 3, |x, y| x.0.cmp(&y.0)), [(0, 'd'), (1, 'a'), (2, 'c')]);
        assert!(merge_sorted(Vec::<Vec<u8>>::new(), 5, u8::cmp).is_empty());
    }
}
