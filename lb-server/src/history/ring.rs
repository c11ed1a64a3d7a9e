//! A fixed-capacity series: the newest `capacity` values, oldest first.

use std::collections::VecDeque;

/// The newest `capacity` values pushed, oldest first; memory is allocated
/// once, at the capacity.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    values: VecDeque<T>,
    capacity: usize,
}

impl<T: Clone> Ring<T> {
    /// An empty series of at most `capacity` values.
    pub fn new(capacity: usize) -> Self {
        Ring {
            values: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
        }
    }

    /// A series of `len` copies of `value` (a backend that appears late is
    /// padded to the service's length).
    pub fn filled(capacity: usize, len: usize, value: T) -> Self {
        let mut r = Ring::new(capacity);
        for _ in 0..len.min(r.capacity) {
            r.push(value.clone());
        }
        r
    }

    /// Appends `value`, forgetting the oldest when full.
    pub fn push(&mut self, value: T) {
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values.push_back(value);
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// The values, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_values() {
        let mut r = Ring::new(3);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
        let padded = Ring::filled(3, 7, 0u8);
        assert_eq!(padded.len(), 3);
    }
}
