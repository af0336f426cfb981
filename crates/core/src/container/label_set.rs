//! A container's labels as the server keeps them: every pair in one
//! string, sorted by key.
//!
//! Why not a `BTreeMap<String, String>`: the server holds the last report
//! of every container of every node (100,000 at the scale it is built
//! for), and a map of seven labels costs a tree node and fourteen strings,
//! about a kilobyte each; in one string with its bounds beside it, and
//! the keys every managed container carries as numbers, a fifth of that. Labels are set once, at creation, and only read after:
//! nothing needs to change one in place.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::labels;

/// Labels, key to value, each key once, iterated in key order.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    /// The labels' text, one after another: key 0 (unless well known),
    /// value 0, key 1, ...
    text: Box<str>,
    /// Two per label: where its key ends in `text`, or [`WELL_KNOWN`]
    /// with the index of a key in [`WELL_KNOWN_KEYS`] (which takes no
    /// text); then where its value ends.
    bounds: Box<[u32]>,
}

/// Marks a key of [`WELL_KNOWN_KEYS`] in [`Labels::bounds`].
const WELL_KNOWN: u32 = 1 << 31;

/// Keys every managed container carries: kept as a number rather than
/// seven copies of the same text per container.
const WELL_KNOWN_KEYS: [&str; 7] = [
    labels::CONTAINER_ID,
    labels::CREATED_AT,
    labels::MANAGED,
    labels::NODE_ID,
    labels::POOL_ID,
    labels::SPEC_HASH,
    labels::WORKLOAD_ID,
];

impl Labels {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        // A handful of labels: a scan is as quick as a search and simpler.
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether `key` is set.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        self.bounds.len() / 2
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bounds.is_empty()
    }

    /// Every label, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.bounds.chunks_exact(2).scan(0usize, |start, pair| {
            let (key, value_start) = if pair[0] & WELL_KNOWN != 0 {
                (WELL_KNOWN_KEYS[(pair[0] & !WELL_KNOWN) as usize], *start)
            } else {
                let key_end = pair[0] as usize;
                (&self.text[*start..key_end], key_end)
            };
            let value_end = pair[1] as usize;
            let value = &self.text[value_start..value_end];
            *start = value_end;
            Some((key, value))
        })
    }

    /// A map of owned strings, for what needs one (a protobuf message).
    pub fn to_map<M: FromIterator<(String, String)>>(&self) -> M {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn from_sorted<'a>(pairs: impl ExactSizeIterator<Item = (&'a str, &'a str)> + Clone) -> Self {
        let well_known = |key: &str| WELL_KNOWN_KEYS.iter().position(|k| *k == key);
        // Sized once: growing by doubling and shrinking at the end would
        // copy each report's labels twice.
        let size = pairs
            .clone()
            .map(|(k, v)| well_known(k).map_or(k.len(), |_| 0) + v.len())
            .sum();
        let mut text = String::with_capacity(size);
        let mut bounds = Vec::with_capacity(pairs.len() * 2);
        for (k, v) in pairs {
            match well_known(k) {
                // At most seven: the index fits with room to spare.
                Some(index) => bounds.push(WELL_KNOWN | index as u32),
                None => {
                    text.push_str(k);
                    bounds.push(end_of(&text));
                }
            }
            text.push_str(v);
            bounds.push(end_of(&text));
        }
        Self {
            text: text.into_boxed_str(),
            bounds: bounds.into_boxed_slice(),
        }
    }
}

fn end_of(text: &str) -> u32 {
    // Labels come from Docker and protobuf messages, both bounded far
    // below 2 GiB (the top bit marks a well-known key); a longer text is
    // a bug upstream, not input to accept.
    let end = u32::try_from(text.len()).unwrap_or(u32::MAX);
    assert!(end < WELL_KNOWN, "labels of 2 GiB or more");
    end
}

/// From pairs in any order; a key given twice keeps its last value, as a
/// map's insert would.
impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let pairs: Vec<(K, V)> = pairs.into_iter().collect();
        let mut sorted: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        // Stable: of a key given twice, the last comes last, and is kept.
        sorted.sort_by_key(|(k, _)| *k);
        let last_of_each: Vec<(&str, &str)> = sorted
            .iter()
            .enumerate()
            .filter(|(i, (k, _))| sorted.get(i + 1).is_none_or(|(next, _)| next != k))
            .map(|(_, pair)| *pair)
            .collect();
        Self::from_sorted(last_of_each.into_iter())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self::from_sorted(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        Self::from_sorted(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

impl std::ops::Index<&str> for Labels {
    type Output = str;
    fn index(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// As a map, the way a `BTreeMap` is: the same JSON as before.
impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;
        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Labels, A::Error> {
                let mut pairs: Vec<(String, String)> = Vec::new();
                while let Some(pair) = access.next_entry()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }
        deserializer.deserialize_map(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Keys of every kind: well known, near misses of those, and others
    /// that sort before, between and after them.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(WELL_KNOWN_KEYS.to_vec()).prop_map(str::to_owned),
            proptest::sample::select(WELL_KNOWN_KEYS.to_vec()).prop_map(|k| format!("{k}x")),
            "[a-z.é-]{0,6}",
            "boilerhouse\\.[a-z-]{0,12}",
        ]
    }

    proptest! {
        /// Whatever pairs it is built from, it answers as a map built from
        /// the same pairs would: every lookup, the order, the length.
        #[test]
        fn it_answers_as_the_map_it_replaces(
            pairs in proptest::collection::vec((key(), ".{0,8}"), 0..12),
            probes in proptest::collection::vec(key(), 0..8),
        ) {
            let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
            let labels: Labels = pairs.iter().cloned().collect();
            prop_assert_eq!(labels.len(), map.len());
            prop_assert_eq!(labels.is_empty(), map.is_empty());
            let iterated: Vec<(&str, &str)> = labels.iter().collect();
            let expected: Vec<(&str, &str)> =
                map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(iterated, expected);
            for probe in probes.iter().chain(map.keys()) {
                prop_assert_eq!(labels.get(probe), map.get(probe).map(String::as_str));
            }
            prop_assert_eq!(&Labels::from(&map), &labels);
            let json = serde_json::to_string(&labels).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&map).unwrap());
            prop_assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), labels.clone());
            let back: BTreeMap<String, String> = labels.to_map();
            prop_assert_eq!(back, map);
        }
    }

    #[test]
    fn a_key_given_twice_keeps_the_last_value_as_a_map_does() {
        let labels: Labels = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(labels.get("a"), Some("3"));
        assert_eq!(labels.len(), 2);
    }
}
