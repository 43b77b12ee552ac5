//! The stream table: the streams of a session by id, giving back a burst's room.

use std::collections::HashMap;

use tether_proto::StreamId;

use super::stream::Stream;

/// The stream table never shrinks below this many slots.
const MIN_TABLE_CAPACITY: usize = 64;

/// The streams of a session by id.
#[derive(Default)]
pub(super) struct Streams {
    map: HashMap<StreamId, Stream>,
}

impl Streams {
    pub(super) fn get(&self, id: StreamId) -> Option<&Stream> {
        self.map.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.map.get_mut(&id)
    }

    pub(super) fn insert(&mut self, id: StreamId, stream: Stream) {
        self.map.insert(id, stream);
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn contains(&self, id: StreamId) -> bool {
        self.map.contains_key(&id)
    }

    pub(super) fn ids(&self) -> Vec<StreamId> {
        self.map.keys().copied().collect()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (StreamId, &Stream)> {
        self.map.iter().map(|(id, s)| (*id, s))
    }

    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Removes `id`, giving back most of a burst's room once three quarters are free (halving
    /// at a quarter full keeps the cost amortised).
    pub(super) fn remove(&mut self, id: StreamId) -> Option<Stream> {
        let stream = self.map.remove(&id)?;
        let capacity = self.map.capacity();
        if capacity > MIN_TABLE_CAPACITY && self.map.len() * 4 < capacity {
            self.map.shrink_to(self.map.len() * 2);
        }
        Some(stream)
    }
}
