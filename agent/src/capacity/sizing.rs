//! What to buy: the smallest ExpressRoute circuit, ExpressRoute gateway and VPN gateway that
//! carry a rate with headroom. The figures are Microsoft's published ones, kept in one
//! table here (from `shared/REFERENCE.md`); change them here when Azure changes them.

use serde::Serialize;

use super::rate::Rate;

/// ExpressRoute circuit bandwidths (per direction), bits per second.
pub const ER_CIRCUITS: [u64; 8] = [
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A gateway size: its name(s), aggregate bandwidth and packet rate (when published).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub sku: &'static str,
    pub bps: u64,
    pub pps: Option<u64>,
}

/// ExpressRoute virtual network gateways.
pub const ER_GATEWAYS: [Gateway; 3] = [
    Gateway {
        sku: "Standard / ErGw1Az",
        bps: 1_000_000_000,
        pps: Some(100_000),
    },
    Gateway {
        sku: "HighPerformance / ErGw2Az",
        bps: 2_000_000_000,
        pps: Some(200_000),
    },
    Gateway {
        sku: "UltraPerformance / ErGw3Az",
        bps: 10_000_000_000,
        pps: Some(1_000_000),
    },
];

/// `ErGwScale`: bandwidth per scale unit.
pub const ER_SCALE_UNIT_BPS: u64 = 1_000_000_000;

/// VPN gateways (aggregate over tunnels).
pub const VPN_GATEWAYS: [Gateway; 5] = [
    Gateway {
        sku: "VpnGw1",
        bps: 650_000_000,
        pps: None,
    },
    Gateway {
        sku: "VpnGw2",
        bps: 1_000_000_000,
        pps: None,
    },
    Gateway {
        sku: "VpnGw3",
        bps: 1_250_000_000,
        pps: None,
    },
    Gateway {
        sku: "VpnGw4",
        bps: 5_000_000_000,
        pps: None,
    },
    Gateway {
        sku: "VpnGw5",
        bps: 10_000_000_000,
        pps: None,
    },
];

/// One IPsec tunnel with GCMAES256 carries from 650 Mbit/s (62k packets/s) on the
/// smallest gateways to 2.3 Gbit/s (220k packets/s) on the largest.
pub const VPN_TUNNEL_MIN: (u64, u64) = (650_000_000, 62_000);
pub const VPN_TUNNEL_MAX: (u64, u64) = (2_300_000_000, 220_000);

/// Packets larger than this are fragmented by ExpressRoute gateways.
pub const ER_FRAGMENT_ABOVE: usize = 1400;

/// What a rate needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// The rate to carry (from --need, or the measured capacity).
    pub need_bps: u64,
    /// Headroom added, as a fraction (0.3 for 30%).
    pub headroom: f64,
    /// need × (1 + headroom).
    pub required_bps: u64,
    /// Packet rate at the required rate and the packet size given.
    pub required_pps: u64,
    /// The smallest ExpressRoute circuit that carries it, if one does.
    pub er_circuit_bps: Option<u64>,
    pub er_gateway: Option<Gateway>,
    /// `ErGwScale` scale units that carry it.
    pub er_scale_units: u64,
    pub vpn_gateway: Option<Gateway>,
    /// Things to know: more than one circuit, a tunnel limit, fragmentation.
    pub notes: Vec<String>,
}

/// The recommendation for `need` with `headroom` (0.3 = 30%) at IP packets of
/// `packet_octets`.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
pub fn recommend(need: Rate, headroom: f64, packet_octets: usize) -> Recommendation {
    let required = (need.bps() as f64 * (1.0 + headroom)).ceil() as u64;
    let pps = required.div_ceil(8 * packet_octets.max(1) as u64);
    let er_circuit_bps = ER_CIRCUITS.iter().copied().find(|&c| c >= required);
    let er_gateway = ER_GATEWAYS
        .iter()
        .copied()
        .find(|g| g.bps >= required && g.pps.is_none_or(|p| p >= pps));
    let vpn_gateway = VPN_GATEWAYS.iter().copied().find(|g| g.bps >= required);
    let mut notes = Vec::new();
    if er_circuit_bps.is_none() {
        notes.push(
            "more than the largest ExpressRoute circuit (10 Gbit/s): use ExpressRoute Direct (10 or 100 Gbit/s ports) or several circuits"
                .to_string(),
        );
    }
    if er_gateway.is_none() {
        notes.push(format!(
            "more than one ExpressRoute gateway carries ({} at {pps} packets/s): use ErGwScale or FastPath",
            Rate(required)
        ));
    }
    if vpn_gateway.is_none() {
        notes.push("more than the largest VPN gateway (VpnGw5, 10 Gbit/s) carries".to_string());
    }
    if required > VPN_TUNNEL_MAX.0 || pps > VPN_TUNNEL_MAX.1 {
        notes.push(format!(
            "one IPsec tunnel carries at most {} ({} packets/s): the VPN needs several tunnels",
            Rate(VPN_TUNNEL_MAX.0),
            VPN_TUNNEL_MAX.1
        ));
    } else if required > VPN_TUNNEL_MIN.0 || pps > VPN_TUNNEL_MIN.1 {
        notes.push(format!(
            "above {} ({} packets/s) one IPsec tunnel is enough only on the larger VPN gateways",
            Rate(VPN_TUNNEL_MIN.0),
            VPN_TUNNEL_MIN.1
        ));
    }
    if packet_octets > ER_FRAGMENT_ABOVE {
        notes.push(format!(
            "{packet_octets}-octet packets are fragmented by ExpressRoute gateways (above {ER_FRAGMENT_ABOVE}): keep the MTU/MSS below that"
        ));
    }
    Recommendation {
        need_bps: need.bps(),
        headroom,
        required_bps: required,
        required_pps: pps,
        er_circuit_bps,
        er_gateway,
        er_scale_units: required.div_ceil(ER_SCALE_UNIT_BPS).max(1),
        vpn_gateway,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_moves_the_choice_up_a_size() {
        // 40 Mbit/s + 30% = 52 Mbit/s: the 50 Mbit/s circuit is too small.
        let r = recommend(Rate(40_000_000), 0.3, 1400);
        assert_eq!(r.required_bps, 52_000_000);
        assert_eq!(r.er_circuit_bps, Some(100_000_000));
        assert_eq!(r.er_gateway.map(|g| g.sku), Some("Standard / ErGw1Az"));
        assert_eq!(r.vpn_gateway.map(|g| g.sku), Some("VpnGw1"));
        assert_eq!(r.er_scale_units, 1);
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        // Without headroom the 50 Mbit/s circuit is enough.
        assert_eq!(
            recommend(Rate(40_000_000), 0.0, 1400).er_circuit_bps,
            Some(50_000_000)
        );
    }

    #[test]
    fn exact_fits_are_enough() {
        let r = recommend(Rate(1_000_000_000), 0.0, 1400);
        assert_eq!(r.er_circuit_bps, Some(1_000_000_000));
        assert_eq!(r.vpn_gateway.map(|g| g.sku), Some("VpnGw2"));
    }

    #[test]
    fn small_packets_need_a_gateway_for_their_packet_rate() {
        // 800 Mbit/s of 100-octet packets is 1M packets/s: only ErGw3Az has the pps.
        let r = recommend(Rate(800_000_000), 0.0, 100);
        assert_eq!(r.required_pps, 1_000_000);
        assert_eq!(
            r.er_gateway.map(|g| g.sku),
            Some("UltraPerformance / ErGw3Az")
        );
        assert!(
            r.notes.iter().any(|n| n.contains("several tunnels")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn beyond_the_table_says_so() {
        let r = recommend(Rate(20_000_000_000), 0.3, 1400);
        assert_eq!(r.er_circuit_bps, None);
        assert_eq!(r.er_gateway, None);
        assert_eq!(r.vpn_gateway, None);
        assert_eq!(r.er_scale_units, 26);
        assert!(r.notes.iter().any(|n| n.contains("ExpressRoute Direct")));
        assert!(r.notes.iter().any(|n| n.contains("VpnGw5")));
    }

    #[test]
    fn large_packets_are_warned_about_fragmentation() {
        let r = recommend(Rate(10_000_000), 0.3, 1500);
        assert!(
            r.notes.iter().any(|n| n.contains("fragmented")),
            "{:?}",
            r.notes
        );
    }
}
