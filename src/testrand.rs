//! A seeded pseudo-random source for the tests that throw mangled input at
//! the parsers: the same inputs on every run, so a failure repeats.

/// xorshift64: fast, good enough to pick bytes, and never zero.
pub struct Rand(u64);

impl Rand {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Makes 1 to `max_edits` random edits to `input` (not empty): a byte
    /// overwritten, dropped or added, the new ones drawn from `alphabet`.
    pub fn mangle(&mut self, input: &mut Vec<u8>, alphabet: &[u8], max_edits: usize) {
        for _ in 0..=self.below(max_edits) {
            let at = self.below(input.len().max(1));
            match self.below(3) {
                0 if at < input.len() => input[at] = *self.pick(alphabet),
                1 if at < input.len() => {
                    input.remove(at);
                }
                _ => input.insert(at.min(input.len()), *self.pick(alphabet)),
            }
        }
    }
}
