//! One direction of an emulated path, sans-IO: given a packet's arrival time and size, it
//! decides whether the packet is lost and when (and how many times) it is released.
//!
//! In order: a blackout drops everything; random loss, then Gilbert-Elliott bursty loss;
//! the rate limit serializes packets through a queue of bounded size (a full queue drops,
//! and a growing queue adds delay, as at a real bottleneck); then fixed delay plus jitter
//! (uniform or normal); without reordering a packet is never released before the one ahead
//! of it. Duplication releases a second copy with the first.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How jitter is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distribution {
    /// Uniform in ±jitter.
    #[default]
    Uniform,
    /// Normal with standard deviation `jitter`, truncated at ±3σ.
    Normal,
}

/// Gilbert-Elliott bursty loss: a good and a bad state, a chance per packet to move from
/// one to the other, and a loss probability in the bad state (none in the good one).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GilbertElliott {
    pub good_to_bad: f64,
    pub bad_to_good: f64,
    pub loss_in_bad: f64,
}

/// The settings of one direction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkConfig {
    pub delay: Duration,
    pub jitter: Duration,
    pub distribution: Distribution,
    /// Whether jitter may reorder packets.
    pub reorder: bool,
    /// Random loss probability (0 to 1).
    pub loss: f64,
    pub burst: Option<GilbertElliott>,
    /// Bottleneck rate in bits per second; `None` for unlimited.
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops.
    pub queue_bytes: u64,
    /// Duplication probability (0 to 1).
    pub duplicate: f64,
    /// Outages, as (start after the emulator started, length).
    pub blackouts: Vec<(Duration, Duration)>,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Blackout,
    Random,
    Burst,
    QueueFull,
}

/// A packet's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Dropped(Drop),
    /// Released at this time, once or (duplicated) twice.
    Released {
        at_ns: u64,
        copies: u8,
    },
}

/// A small, fast, seedable generator (xorshift64*); the emulator needs speed and
/// repeatability, not cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    #[allow(clippy::cast_precision_loss)] // 53 random bits into a double's mantissa
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// One direction of a path.
#[derive(Debug, Clone)]
pub struct Link {
    cfg: LinkConfig,
    rng: Rng,
    start_ns: u64,
    bad: bool,
    /// When the bottleneck finishes sending what it holds.
    busy_until_ns: u64,
    /// Release time of the last packet (no reordering: nothing before it).
    last_release_ns: u64,
}

impl Link {
    /// A link that started at `start_ns`.
    pub fn new(cfg: LinkConfig, start_ns: u64, seed: u64) -> Self {
        Self {
            cfg,
            rng: Rng::new(seed),
            start_ns,
            bad: false,
            busy_until_ns: start_ns,
            last_release_ns: 0,
        }
    }

    /// The settings.
    pub const fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    fn jitter_ns(&mut self) -> i64 {
        let j = self.cfg.jitter.as_nanos() as f64;
        if j == 0.0 {
            return 0;
        }
        let x = match self.cfg.distribution {
            Distribution::Uniform => (self.rng.unit() * 2.0 - 1.0) * j,
            Distribution::Normal => (self.rng.normal() * j).clamp(-3.0 * j, 3.0 * j),
        };
        x as i64
    }

    /// The fate of a packet of `len` octets arriving at `now_ns`.
    pub fn admit(&mut self, now_ns: u64, len: usize) -> Fate {
        let since = Duration::from_nanos(now_ns.saturating_sub(self.start_ns));
        if self
            .cfg
            .blackouts
            .iter()
            .any(|&(at, length)| since >= at && since < at + length)
        {
            return Fate::Dropped(Drop::Blackout);
        }
        if self.rng.chance(self.cfg.loss) {
            return Fate::Dropped(Drop::Random);
        }
        if let Some(ge) = self.cfg.burst {
            let flip = if self.bad {
                ge.bad_to_good
            } else {
                ge.good_to_bad
            };
            if self.rng.chance(flip) {
                self.bad = !self.bad;
            }
            if self.bad && self.rng.chance(ge.loss_in_bad) {
                return Fate::Dropped(Drop::Burst);
            }
        }
        let mut depart = now_ns;
        if let Some(rate) = self.cfg.rate_bps.filter(|&r| r > 0) {
            let start = self.busy_until_ns.max(now_ns);
            let backlog_bytes = u128::from(start - now_ns) * u128::from(rate) / 8_000_000_000;
            if backlog_bytes + len as u128 > u128::from(self.cfg.queue_bytes.max(len as u64)) {
                return Fate::Dropped(Drop::QueueFull);
            }
            let serialize =
                u64::try_from(u128::from(len as u64) * 8_000_000_000 / u128::from(rate))
                    .unwrap_or(u64::MAX);
            self.busy_until_ns = start + serialize;
            depart = self.busy_until_ns;
        }
        let delay = u64::try_from(self.cfg.delay.as_nanos()).unwrap_or(u64::MAX);
        let mut at = depart
            .saturating_add(delay)
            .saturating_add_signed(self.jitter_ns());
        at = at.max(depart);
        if !self.cfg.reorder {
            at = at.max(self.last_release_ns);
        }
        self.last_release_ns = self.last_release_ns.max(at);
        let copies = if self.rng.chance(self.cfg.duplicate) {
            2
        } else {
            1
        };
        Fate::Released { at_ns: at, copies }
    }
}

/// A link written as `key=value` pairs separated by commas, for the command line:
/// `delay=15ms,jitter=3ms,dist=normal,reorder=yes,loss=0.5%,burst=0.01/0.3/0.5,rate=100M,
/// queue=64k,dup=0.1%`.
impl FromStr for LinkConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut cfg = Self::default();
        cfg.apply(s)?;
        Ok(cfg)
    }
}

fn percent_or_ratio(v: &str) -> Result<f64, String> {
    let (num, scale) = v.strip_suffix('%').map_or((v, 1.0), |n| (n, 100.0));
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a probability: write 0.01 or 1%"))?;
    let p = x / scale;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("`{v}` is not between 0 and 1 (0% and 100%)"))
    }
}

fn si(v: &str, what: &str) -> Result<u64, String> {
    let (num, mult) = match v.char_indices().last() {
        Some((i, 'k' | 'K')) => (&v[..i], 1_000u32),
        Some((i, 'M')) => (&v[..i], 1_000_000),
        Some((i, 'G')) => (&v[..i], 1_000_000_000),
        _ => (v, 1),
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a {what}: write it like 100M or 64k"))?;
    if x < 0.0 {
        return Err(format!("{what} `{v}` is negative"));
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    Ok((x * f64::from(mult)) as u64)
}

fn duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("`{v}` is not a duration ({e}): write it like 5ms"))
}

/// `AFTER+LENGTH`, like `20s+5s`.
pub fn blackout(v: &str) -> Result<(Duration, Duration), String> {
    let (a, l) = v
        .split_once('+')
        .ok_or_else(|| format!("blackout `{v}` must be AFTER+LENGTH, like 20s+5s"))?;
    Ok((duration(a)?, duration(l)?))
}

impl LinkConfig {
    /// Applies `key=value,...` on top of these settings.
    pub fn apply(&mut self, spec: &str) -> Result<(), String> {
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            match key {
                "delay" => self.delay = duration(v)?,
                "jitter" => self.jitter = duration(v)?,
                "dist" => {
                    self.distribution = match v {
                        "uniform" => Distribution::Uniform,
                        "normal" => Distribution::Normal,
                        _ => return Err(format!("dist `{v}`: use uniform or normal")),
                    }
                }
                "reorder" => {
                    self.reorder = match v {
                        "yes" | "true" => true,
                        "no" | "false" => false,
                        _ => return Err(format!("reorder `{v}`: use yes or no")),
                    }
                }
                "loss" => self.loss = percent_or_ratio(v)?,
                "burst" => {
                    let parts: Vec<&str> = v.split('/').collect();
                    let [to_bad, to_good, in_bad] = parts[..] else {
                        return Err(format!(
                            "burst `{v}` must be GOOD_TO_BAD/BAD_TO_GOOD/LOSS_IN_BAD, like 1%/30%/50%"
                        ));
                    };
                    self.burst = Some(GilbertElliott {
                        good_to_bad: percent_or_ratio(to_bad)?,
                        bad_to_good: percent_or_ratio(to_good)?,
                        loss_in_bad: percent_or_ratio(in_bad)?,
                    });
                }
                "rate" => self.rate_bps = Some(si(v, "rate")?).filter(|&r| r > 0),
                "queue" => self.queue_bytes = si(v, "queue size")?,
                "dup" => self.duplicate = percent_or_ratio(v)?,
                "blackout" => self.blackouts.push(blackout(v)?),
                _ => {
                    return Err(format!(
                        "unknown link setting `{key}`: use delay, jitter, dist, reorder, loss, burst, rate, queue, dup or blackout"
                    ));
                }
            }
        }
        if self.rate_bps.is_some() && self.queue_bytes == 0 {
            // A bottleneck without a stated queue holds 50 ms of traffic.
            self.queue_bytes = self.rate_bps.unwrap_or(0) / 8 / 20;
        }
        Ok(())
    }
}

/// Named starting points, so that users need not know the knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A private circuit to a nearby Azure region: 1 ms each way, tight jitter, no loss,
    /// a 1 Gbit/s circuit.
    Expressroute,
    /// IPsec over the internet: 15 ms each way, wide jitter with some reordering, a little
    /// random and bursty loss, a 100 Mbit/s tunnel.
    Vpn,
}

impl Profile {
    /// The settings of one direction.
    pub fn link(self) -> LinkConfig {
        let spec = match self {
            Self::Expressroute => "delay=1ms,jitter=50us,dist=normal,reorder=no,rate=1G,queue=1M",
            Self::Vpn => {
                "delay=15ms,jitter=3ms,dist=normal,reorder=yes,loss=0.3%,burst=0.5%/40%/50%,rate=100M,queue=256k"
            }
        };
        spec.parse().unwrap_or_default()
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Expressroute => "expressroute",
            Self::Vpn => "vpn",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn fixed_delay_is_exact() {
        let mut l = Link::new("delay=5ms".parse().unwrap(), 0, 1);
        assert_eq!(
            l.admit(10 * MS, 100),
            Fate::Released {
                at_ns: 15 * MS,
                copies: 1
            }
        );
    }

    #[test]
    fn uniform_jitter_stays_in_bounds_and_centres_on_the_delay() {
        let mut l = Link::new("delay=10ms,jitter=2ms,reorder=yes".parse().unwrap(), 0, 7);
        let mut sum = 0i128;
        for i in 0..10_000u64 {
            let Fate::Released { at_ns, .. } = l.admit(i * MS, 100) else {
                panic!()
            };
            let d = at_ns - i * MS;
            assert!((8 * MS..=12 * MS).contains(&d), "{d}");
            sum += i128::from(d);
        }
        let mean = sum / 10_000;
        assert!(
            (mean - i128::from(10 * MS)).abs() < i128::from(MS / 20),
            "mean {mean}"
        );
    }

    #[test]
    fn normal_jitter_has_the_asked_spread() {
        let mut l = Link::new(
            "delay=20ms,jitter=1ms,dist=normal,reorder=yes"
                .parse()
                .unwrap(),
            0,
            3,
        );
        let ds: Vec<f64> = (0..20_000u64)
            .map(|i| match l.admit(i * 100 * MS, 100) {
                #[allow(clippy::cast_precision_loss)]
                Fate::Released { at_ns, .. } => (at_ns - i * 100 * MS) as f64,
                Fate::Dropped(_) => unreachable!(),
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let n = ds.len() as f64;
        let mean = ds.iter().sum::<f64>() / n;
        let sd = (ds.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!((mean - 20e6).abs() < 0.05e6, "mean {mean}");
        assert!((sd - 1e6).abs() < 0.05e6, "sd {sd}");
    }

    #[test]
    fn without_reordering_releases_never_go_backwards() {
        let mut l = Link::new("delay=10ms,jitter=5ms".parse().unwrap(), 0, 9);
        let mut last = 0;
        for i in 0..5_000u64 {
            let Fate::Released { at_ns, .. } = l.admit(i * 100_000, 100) else {
                panic!()
            };
            assert!(at_ns >= last);
            last = at_ns;
        }
    }

    #[test]
    fn random_loss_matches_the_probability() {
        let mut l = Link::new("loss=2%".parse().unwrap(), 0, 11);
        let lost = (0..100_000u64)
            .filter(|&i| matches!(l.admit(i, 100), Fate::Dropped(Drop::Random)))
            .count();
        assert!((1_800..=2_200).contains(&lost), "{lost}");
    }

    #[test]
    fn burst_loss_comes_in_runs() {
        // Stationary share of bad: 0.01 / (0.01 + 0.2) = 4.76%; loss in bad 100%.
        let mut l = Link::new("burst=1%/20%/100%".parse().unwrap(), 0, 5);
        let fates: Vec<bool> = (0..200_000u64)
            .map(|i| matches!(l.admit(i, 100), Fate::Dropped(_)))
            .collect();
        let lost = fates.iter().filter(|&&x| x).count();
        let runs = fates.windows(2).filter(|w| !w[0] && w[1]).count();
        assert!((8_000..=11_500).contains(&lost), "{lost}");
        // Mean run length 1 / 0.2 = 5 packets.
        #[allow(clippy::cast_precision_loss)]
        let mean_run = lost as f64 / runs as f64;
        assert!((4.0..=6.0).contains(&mean_run), "{mean_run}");
    }

    #[test]
    fn a_rate_limit_queues_then_drops() {
        // 8 Mbit/s: 1,000 octets take 1 ms. Queue of 5,000 octets.
        let mut l = Link::new("rate=8M,queue=5000".parse().unwrap(), 0, 1);
        let fates: Vec<Fate> = (0..10).map(|_| l.admit(0, 1_000)).collect();
        // Five fit (the first one departs after 1 ms, the fifth after 5 ms), the rest drop.
        for (i, f) in fates.iter().enumerate().take(5) {
            assert_eq!(
                *f,
                Fate::Released {
                    at_ns: (i as u64 + 1) * MS,
                    copies: 1
                }
            );
        }
        assert!(
            fates[5..]
                .iter()
                .all(|f| *f == Fate::Dropped(Drop::QueueFull))
        );
        // Once drained, it accepts again.
        assert_eq!(
            l.admit(6 * MS, 1_000),
            Fate::Released {
                at_ns: 7 * MS,
                copies: 1
            }
        );
    }

    #[test]
    fn blackouts_drop_everything_in_their_window() {
        let mut l = Link::new("blackout=1s+500ms".parse().unwrap(), 0, 1);
        assert!(matches!(l.admit(999 * MS, 1), Fate::Released { .. }));
        assert_eq!(l.admit(1_000 * MS, 1), Fate::Dropped(Drop::Blackout));
        assert_eq!(l.admit(1_499 * MS, 1), Fate::Dropped(Drop::Blackout));
        assert!(matches!(l.admit(1_500 * MS, 1), Fate::Released { .. }));
    }

    #[test]
    fn duplication_matches_the_probability() {
        let mut l = Link::new("dup=10%".parse().unwrap(), 0, 13);
        let dups = (0..50_000u64)
            .filter(|&i| matches!(l.admit(i, 1), Fate::Released { copies: 2, .. }))
            .count();
        assert!((4_500..=5_500).contains(&dups), "{dups}");
    }

    #[test]
    fn specs_are_checked() {
        assert!(
            "delay=5"
                .parse::<LinkConfig>()
                .unwrap_err()
                .contains("duration")
        );
        assert!(
            "loss=150%"
                .parse::<LinkConfig>()
                .unwrap_err()
                .contains("between 0 and 1")
        );
        assert!(
            "latency=5ms"
                .parse::<LinkConfig>()
                .unwrap_err()
                .contains("unknown link setting")
        );
        assert!(
            "burst=1%"
                .parse::<LinkConfig>()
                .unwrap_err()
                .contains("GOOD_TO_BAD")
        );
        assert_eq!(
            "rate=100M".parse::<LinkConfig>().unwrap().queue_bytes,
            625_000
        );
    }

    #[test]
    fn profiles_parse() {
        assert_eq!(Profile::Expressroute.link().delay, Duration::from_millis(1));
        let vpn = Profile::Vpn.link();
        assert_eq!(vpn.rate_bps, Some(100_000_000));
        assert!(vpn.burst.is_some() && vpn.reorder);
    }
}
