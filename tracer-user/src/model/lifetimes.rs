//! How long a site's freed blocks lived: the first few lifetimes kept exactly, inline, and an
//! hdrhistogram once there are more.
//!
//! Most sites free only a handful of blocks (in a python run, 9 in 10 of its 10 000 sites
//! freed 8 or fewer), and an hdrhistogram covering a microsecond to an hour at one significant
//! digit is 1.9 KB: one per site was the largest part of the model on deep-stacked programs.

use hdrhistogram::Histogram;

/// Lifetimes kept exactly before a histogram takes over.
const FEW: usize = 8;
/// The longest lifetime told apart, µs (an hour); longer ones count as an hour.
const LONGEST_US: u64 = 3_600_000_000;

#[derive(Clone, Debug, Default)]
pub enum Lifetimes {
    #[default]
    None,
    /// The first `n` lifetimes, µs.
    Few {
        n: u8,
        us: [u32; FEW],
    },
    Many(Box<Histogram<u32>>),
}

impl Lifetimes {
    /// Records one block's lifetime, in µs.
    pub fn record(&mut self, us: u64) {
        let us = us.clamp(1, LONGEST_US);
        if let Lifetimes::Few { n, .. } = self
            && *n as usize == FEW
        {
            let mut h = histogram();
            self.add_to(&mut h);
            *self = Lifetimes::Many(h);
        }
        match self {
            Lifetimes::None => {
                let mut few = [0; FEW];
                few[0] = us as u32;
                *self = Lifetimes::Few { n: 1, us: few };
            }
            Lifetimes::Few { n, us: few } => {
                few[*n as usize] = us as u32;
                *n += 1;
            }
            Lifetimes::Many(h) => h.saturating_record(us),
        }
    }

    /// Adds `other`'s lifetimes to these (sites that symbolize the same are one).
    pub fn merge(&mut self, other: &Lifetimes) {
        match other {
            Lifetimes::None => {}
            Lifetimes::Few { n, us } => {
                for &v in &us[..*n as usize] {
                    self.record(u64::from(v));
                }
            }
            Lifetimes::Many(theirs) => {
                let mut h = theirs.clone();
                self.add_to(&mut h);
                *self = Lifetimes::Many(h);
            }
        }
    }

    /// Adds these lifetimes to the histogram `h`.
    fn add_to(&self, h: &mut Histogram<u32>) {
        match self {
            Lifetimes::None => {}
            Lifetimes::Few { n, us } => {
                for &v in &us[..*n as usize] {
                    h.saturating_record(u64::from(v));
                }
            }
            // Same bounds on both sides: adding cannot fail.
            Lifetimes::Many(mine) => {
                let _ = h.add(mine.as_ref());
            }
        }
    }

    /// The lifetime at quantile `q` (0..=1), µs; `None` before any block was freed. Exact
    /// while few, within a significant digit after.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        match self {
            Lifetimes::None => None,
            Lifetimes::Few { n, us } => {
                let mut sorted = us[..*n as usize].to_vec();
                sorted.sort_unstable();
                // The smallest value with at least q of the values at or below it.
                let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                Some(u64::from(sorted[rank - 1]))
            }
            Lifetimes::Many(h) => Some(h.value_at_quantile(q)),
        }
    }
}

fn histogram() -> Box<Histogram<u32>> {
    Box::new(Histogram::new_with_bounds(1, LONGEST_US, 1).expect("valid histogram bounds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values: &[u64]) -> Lifetimes {
        let mut l = Lifetimes::default();
        for &v in values {
            l.record(v);
        }
        l
    }

    #[test]
    fn few_lifetimes_give_exact_quantiles() {
        let l = of(&[40, 10, 30, 20]);
        assert!(matches!(l, Lifetimes::Few { n: 4, .. }));
        assert_eq!(l.quantile_us(0.5), Some(20));
        assert_eq!(l.quantile_us(0.99), Some(40));
        assert_eq!(Lifetimes::None.quantile_us(0.5), None);
    }

    #[test]
    fn the_ninth_lifetime_moves_them_into_a_histogram() {
        let values: Vec<u64> = (1..=9).map(|i| i * 1000).collect();
        let l = of(&values);
        assert!(matches!(l, Lifetimes::Many(_)));
        let p50 = l.quantile_us(0.5).unwrap();
        assert!((4500..=5500).contains(&p50), "{p50}");
        assert!(l.quantile_us(0.99).unwrap() >= 9000);
    }

    #[test]
    fn merging_keeps_every_lifetime() {
        let mut a = of(&[1, 2, 3]);
        a.merge(&of(&[4, 5]));
        assert!(matches!(a, Lifetimes::Few { n: 5, .. }));
        assert_eq!(a.quantile_us(1.0), Some(5));
        a.merge(&of(&(100..120).collect::<Vec<_>>()));
        let Lifetimes::Many(h) = &a else {
            panic!("25 lifetimes are many");
        };
        assert_eq!(h.len(), 25);
        let mut b = of(&(100..120).collect::<Vec<_>>());
        b.merge(&of(&[1, 2]));
        let Lifetimes::Many(h) = &b else {
            panic!("22 lifetimes are many");
        };
        assert_eq!(h.len(), 22);
    }
}
