//! IP ranges in CIDR form, for the block list: parsed strictly, normalised to their network
//! address, and matched against client addresses (IPv4-mapped IPv6 counts as IPv4).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The shortest IPv4 prefix accepted: a block wider than a /8 is a mistake.
pub const MIN_V4_PREFIX: u8 = 8;
/// The shortest IPv6 prefix accepted.
pub const MIN_V6_PREFIX: u8 = 16;

/// A network: its first address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a CIDR was refused (shown to the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not an address or `address/prefix`.
    #[error("must be an IP address or a CIDR range such as 203.0.113.0/24")]
    Malformed,
    /// Too wide a range.
    #[error("IPv4 prefixes shorter than /8 and IPv6 prefixes shorter than /16 are refused")]
    TooWide,
}

fn v4_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn v6_mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl Cidr {
    /// Parses `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/48`; a bare address is a single
    /// host. Host bits are cleared.
    pub fn parse(text: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => {
                if prefix.is_empty()
                    || prefix.len() > 3
                    || !prefix.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(CidrError::Malformed);
                }
                (
                    addr,
                    Some(prefix.parse::<u8>().map_err(|_| CidrError::Malformed)?),
                )
            }
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Malformed)?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(CidrError::Malformed);
        }
        let min = if addr.is_ipv4() {
            MIN_V4_PREFIX
        } else {
            MIN_V6_PREFIX
        };
        if prefix < min {
            return Err(CidrError::TooWide);
        }
        let network = match addr {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & v4_mask(prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & v6_mask(prefix))),
        };
        Ok(Self { network, prefix })
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & v4_mask(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & v6_mask(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_normalises_and_matches() {
        let host = Cidr::parse("203.0.113.7").unwrap();
        assert_eq!(host.to_string(), "203.0.113.7/32");
        assert!(host.contains("203.0.113.7".parse().unwrap()));
        assert!(!host.contains("203.0.113.8".parse().unwrap()));
        // IPv4-mapped IPv6 is the same host.
        assert!(host.contains("::ffff:203.0.113.7".parse().unwrap()));
        let net = Cidr::parse("203.0.113.99/24").unwrap();
        assert_eq!(net.to_string(), "203.0.113.0/24");
        assert!(net.contains("203.0.113.250".parse().unwrap()));
        assert!(!net.contains("203.0.114.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8:1:2::5/48").unwrap();
        assert_eq!(v6.to_string(), "2001:db8:1::/48");
        assert!(v6.contains("2001:db8:1:ffff::1".parse().unwrap()));
        assert!(!v6.contains("203.0.113.7".parse().unwrap()));
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.1/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn refuses_garbage_and_too_wide_ranges() {
        for bad in [
            "",
            "nope",
            "1.2.3.4/",
            "1.2.3.4/33",
            "1.2.3.4/+8",
            "::/129",
            "1.2.3/8",
            "1.2.3.4/0008",
        ] {
            assert_eq!(Cidr::parse(bad), Err(CidrError::Malformed), "{bad}");
        }
        assert_eq!(Cidr::parse("0.0.0.0/0"), Err(CidrError::TooWide));
        assert_eq!(Cidr::parse("10.0.0.0/7"), Err(CidrError::TooWide));
        assert_eq!(Cidr::parse("2001::/15"), Err(CidrError::TooWide));
    }
}
