//! The range planner: which reads answer a query's range `[from, to)` exactly. The middle
//! of the range is read from the coarsest rollup buckets that fit in it whole, finer
//! buckets toward its edges, and raw windows at its ragged ends, so any range costs at
//! most `2 × levels + 1` reads per path, however long it is. Plain code: a backend runs
//! the pieces against its tables.

/// One read of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// The windows starting in `[from, to)`, read one by one.
    Raw { from: i64, to: i64 },
    /// The rollup buckets of `level` ns starting in `[from, to)` (both multiples of
    /// `level`), and the windows there that the rollup has not reached yet.
    Rollups { level: i64, from: i64, to: i64 },
}

impl Piece {
    /// Where the piece starts and ends.
    pub const fn span(self) -> (i64, i64) {
        match self {
            Self::Raw { from, to } | Self::Rollups { from, to, .. } => (from, to),
        }
    }
}

/// The pieces that cover `[from, to)` exactly, in order, with the rollup `levels` (finest
/// first, each a multiple of the one before).
pub fn plan(from: i64, to: i64, levels: &[i64]) -> Vec<Piece> {
    let mut out = Vec::new();
    cover(from, to, levels, &mut out);
    out
}

fn cover(from: i64, to: i64, levels: &[i64], out: &mut Vec<Piece>) {
    if from >= to {
        return;
    }
    let Some((&level, finer)) = levels.split_last() else {
        out.push(Piece::Raw { from, to });
        return;
    };
    // The first and last bucket boundaries inside the range.
    let first = from + (level - from.rem_euclid(level)) % level;
    let last = to - to.rem_euclid(level);
    if first >= last {
        cover(from, to, finer, out);
        return;
    }
    cover(from, first, finer, out);
    out.push(Piece::Rollups {
        level,
        from: first,
        to: last,
    });
    cover(last, to, finer, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000_000;
    const LEVELS: [i64; 3] = [MIN, 10 * MIN, 60 * MIN];
    const S: i64 = 1_000_000_000;

    /// The pieces tile the range: in order, end to end, nothing outside; rollups on their
    /// level's boundaries.
    fn check_tiles(from: i64, to: i64) -> Vec<Piece> {
        let p = plan(from, to, &LEVELS);
        let mut at = from;
        for piece in &p {
            let (a, b) = piece.span();
            assert_eq!(a, at, "{p:?}");
            assert!(a < b, "{p:?}");
            if let Piece::Rollups { level, .. } = *piece {
                assert_eq!((a % level, b % level), (0, 0), "{p:?}");
            }
            at = b;
        }
        assert_eq!(at, to.max(from), "{p:?}");
        assert!(p.len() <= 2 * LEVELS.len() + 1, "{p:?}");
        p
    }

    #[test]
    fn a_day_with_ragged_ends_reads_hours_in_the_middle_and_raw_windows_at_the_ends() {
        let day = 24 * 60 * MIN;
        let p = check_tiles(7 * S, day - 13 * S);
        assert_eq!(
            p,
            vec![
                Piece::Raw {
                    from: 7 * S,
                    to: MIN
                },
                Piece::Rollups {
                    level: MIN,
                    from: MIN,
                    to: 10 * MIN
                },
                Piece::Rollups {
                    level: 10 * MIN,
                    from: 10 * MIN,
                    to: 60 * MIN
                },
                Piece::Rollups {
                    level: 60 * MIN,
                    from: 60 * MIN,
                    to: 23 * 60 * MIN
                },
                Piece::Rollups {
                    level: 10 * MIN,
                    from: 23 * 60 * MIN,
                    to: day - 10 * MIN
                },
                Piece::Rollups {
                    level: MIN,
                    from: day - 10 * MIN,
                    to: day - MIN
                },
                Piece::Raw {
                    from: day - MIN,
                    to: day - 13 * S
                },
            ]
        );
    }

    #[test]
    fn short_and_aligned_ranges_take_one_read() {
        assert_eq!(
            check_tiles(5 * S, 50 * S),
            vec![Piece::Raw {
                from: 5 * S,
                to: 50 * S
            }]
        );
        assert_eq!(
            check_tiles(0, 120 * MIN),
            vec![Piece::Rollups {
                level: 60 * MIN,
                from: 0,
                to: 120 * MIN
            }]
        );
        assert!(plan(10, 10, &LEVELS).is_empty());
        assert!(plan(10, 5, &LEVELS).is_empty());
        assert_eq!(plan(3, 9, &[]), vec![Piece::Raw { from: 3, to: 9 }]);
    }

    #[test]
    fn every_range_is_tiled_exactly() {
        // A deterministic spread of starts and lengths, ragged and aligned, near zero and
        // far from it.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let from = i64::try_from(x % (1 << 50)).unwrap_or(0);
            let len = i64::try_from((x >> 20) % (3 * 24 * 60 * MIN as u64)).unwrap_or(0);
            let snap = |v: i64, to: i64| if x.is_multiple_of(3) { v - v % to } else { v };
            check_tiles(snap(from, MIN), snap(from + len, 10 * MIN));
        }
    }
}
