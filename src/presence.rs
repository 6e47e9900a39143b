//! The only state jat-proxy keeps: which resources of the implementing client are available.

use crate::random::Random;

/// Available resources of the target account, in arrival order, bounded.
#[derive(Debug, Clone)]
pub struct Resources {
    list: Vec<String>,
    max: usize,
}

impl Resources {
    /// An empty set that holds at most `max` resources.
    pub fn new(max: usize) -> Self {
        Resources {
            list: Vec::new(),
            max,
        }
    }

    /// Marks `resource` available. Returns false if it is new and the set is full, in which
    /// case it is not added (the resources already known keep being served).
    pub fn available(&mut self, resource: &str) -> bool {
        if self.list.iter().any(|r| r == resource) {
            return true;
        }
        if self.list.len() >= self.max {
            return false;
        }
        self.list.push(resource.to_owned());
        true
    }

    /// Marks `resource` unavailable.
    pub fn unavailable(&mut self, resource: &str) {
        self.list.retain(|r| r != resource);
    }

    /// Forgets every resource (the session was lost, or the target became unavailable as a
    /// whole).
    pub fn clear(&mut self) {
        self.list.clear();
    }

    /// A uniformly random available resource.
    pub fn pick(&self, rng: &mut dyn Random) -> Option<&str> {
        if self.list.is_empty() {
            return None;
        }
        Some(&self.list[rng.below(self.list.len())])
    }

    /// The available resources.
    pub fn list(&self) -> &[String] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRandom;

    #[test]
    fn add_remove_pick() {
        let mut r = Resources::new(2);
        let mut rng = SeededRandom::new(5);
        assert_eq!(r.pick(&mut rng), None);
        assert!(r.available("a"));
        assert!(r.available("a"));
        assert!(r.available("b"));
        assert!(!r.available("c"), "bounded");
        assert_eq!(r.list(), ["a", "b"]);
        let picks: std::collections::HashSet<_> = (0..64)
            .map(|_| r.pick(&mut rng).unwrap().to_owned())
            .collect();
        assert_eq!(picks.len(), 2, "both resources are used");
        r.unavailable("a");
        assert_eq!(r.pick(&mut rng), Some("b"));
        r.clear();
        assert_eq!(r.pick(&mut rng), None);
    }
}
