//! Capped exponential backoff: each failed try doubles the pause, up to a
//! ceiling, and a success starts over from the first pause.

use std::time::Duration;

/// Pauses between retries of one operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// `(first, max)`: the first pause and the longest.
    pub fn new((first, max): (Duration, Duration)) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The pause before the next try; the one after it is twice as long.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_starts_over_on_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new((ms(100), ms(350)));
        let pauses: Vec<_> = (0..4).map(|_| b.pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(350), ms(350)]);
        b.reset();
        assert_eq!(b.pause(), ms(100));
    }
}
