//! Access policy: which destinations a peer may reach through the gateway.
//!
//! A gateway hands its peers the host's network; it must not hand them the
//! host itself. Every new flow (TCP connect, UDP flow, ICMP echo) asks
//! [`Policy::check`] about its destination before anything touches a socket.
//!
//! Denied by default ([`DEFAULT_DENY`], plus the host's own interface
//! addresses, which the driver supplies):
//! - loopback (127.0.0.0/8, ::1), because services there trust local users;
//! - unspecified and "this network" (0.0.0.0/8, ::), which the kernel
//!   treats as "this host";
//! - link-local (169.254.0.0/16, which holds cloud metadata services at
//!   169.254.169.254, and fe80::/10);
//! - multicast and limited broadcast, which no NAT mapping can answer.
//!
//! IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are judged as the IPv4
//! address they name, so they cannot be used to slip past a v4 rule.
//!
//! `--allow` opens part of a denied range, `--deny` closes more; both may
//! name a port or port range. Order of precedence: an explicit deny wins,
//! then an explicit allow, then the default denials, and everything else is
//! allowed.
//!
//! `--host-address IP` maps one address inside the tunnel to the host's
//! loopback, as slirp's 10.0.2.2 does: [`Policy::map_destination`] rewrites
//! it, and the rewritten loopback destination is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnetwork::IpNetwork;

/// Ranges denied unless `--allow` opens them.
pub const DEFAULT_DENY: &[&str] = &[
    "127.0.0.0/8",
    "::1/128",
    "0.0.0.0/8",
    "::/128",
    "169.254.0.0/16",
    "fe80::/10",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
];

/// A destination range, optionally limited to some ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The addresses.
    pub network: IpNetwork,
    /// The ports; `None` means every port (and port-less protocols, ICMP).
    pub ports: Option<RangeInclusive<u16>>,
}

impl Rule {
    fn matches(&self, dst: IpAddr, port: Option<u16>) -> bool {
        self.network.contains(dst)
            && match (&self.ports, port) {
                (None, _) => true,
                (Some(range), Some(port)) => range.contains(&port),
                (Some(_), None) => false,
            }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.ports, self.network) {
            (None, network) => write!(f, "{network}"),
            (Some(ports), IpNetwork::V4(network)) => write!(f, "{network}:{}", PortRange(ports)),
            (Some(ports), IpNetwork::V6(network)) => write!(f, "[{network}]:{}", PortRange(ports)),
        }
    }
}

struct PortRange<'a>(&'a RangeInclusive<u16>);

impl fmt::Display for PortRange<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.start() == self.0.end() {
            write!(f, "{}", self.0.start())
        } else {
            write!(f, "{}-{}", self.0.start(), self.0.end())
        }
    }
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rule `{text}`: {why} (expected CIDR, CIDR:PORT or CIDR:PORT-PORT; IPv6 as [CIDR]:PORT)"
)]
pub struct RuleError {
    text: String,
    why: &'static str,
}

impl FromStr for Rule {
    type Err = RuleError;

    /// Parses `CIDR`, `CIDR:PORT`, `CIDR:LOW-HIGH`, with IPv6 networks in
    /// brackets when a port follows (`[fd00::/8]:80`). A bare address means
    /// that one address.
    fn from_str(text: &str) -> Result<Self, RuleError> {
        let bad = |why| RuleError {
            text: text.to_owned(),
            why,
        };
        let (network, ports) = if let Some(rest) = text.strip_prefix('[') {
            let (network, after) = rest.split_once(']').ok_or_else(|| bad("missing `]`"))?;
            match after {
                "" => (network, None),
                _ => (
                    network,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("expected `:` after `]`"))?,
                    ),
                ),
            }
        } else if text.matches(':').count() == 1 {
            let (network, ports) = text.split_once(':').expect("one colon");
            (network, Some(ports))
        } else {
            (text, None)
        };
        let network: IpNetwork = network.parse().map_err(|_| bad("not an IP network"))?;
        let ports = ports
            .map(|ports| {
                let (low, high) = ports.split_once('-').unwrap_or((ports, ports));
                let low: u16 = low.parse().map_err(|_| bad("not a port"))?;
                let high: u16 = high.parse().map_err(|_| bad("not a port"))?;
                if low > high {
                    return Err(bad("port range runs backwards"));
                }
                Ok(low..=high)
            })
            .transpose()?;
        Ok(Rule { network, ports })
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// An explicit `--deny` rule.
    Explicit,
    /// One of the default denials, or the host's own address.
    Default,
}

/// The access policy. See the module documentation.
#[derive(Clone, Debug)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    default_deny: Vec<Rule>,
    host_interfaces: Vec<IpAddr>,
    host_address: Option<IpAddr>,
}

impl Policy {
    /// A policy with the default denials, the host's own interface
    /// addresses, and the user's rules.
    pub fn new(
        host_interface_addresses: &[IpAddr],
        allow: Vec<Rule>,
        deny: Vec<Rule>,
        host_address: Option<IpAddr>,
    ) -> Self {
        let default_deny = DEFAULT_DENY
            .iter()
            .map(|text| text.parse().expect("valid built-in rule"))
            .collect();
        let mut policy = Policy {
            allow,
            deny,
            default_deny,
            host_interfaces: Vec::new(),
            host_address,
        };
        policy.set_host_interfaces(host_interface_addresses);
        policy
    }

    /// Replaces the host's own interface addresses, which are denied by
    /// default (they change when interfaces come and go).
    pub fn set_host_interfaces(&mut self, addresses: &[IpAddr]) {
        self.host_interfaces = addresses.iter().map(|ip| ip.to_canonical()).collect();
    }

    /// A policy that allows everything: for tests and embedders that filter
    /// elsewhere.
    pub fn allow_all() -> Self {
        Policy {
            allow: Vec::new(),
            deny: Vec::new(),
            default_deny: Vec::new(),
            host_interfaces: Vec::new(),
            host_address: None,
        }
    }

    /// Rewrites the `--host-address` to the host's loopback of the same
    /// family; other destinations are returned unchanged.
    pub fn map_destination(&self, dst: IpAddr) -> IpAddr {
        match (self.host_address, dst) {
            (Some(host), dst) if host == dst => match dst {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            },
            _ => dst,
        }
    }

    /// May a peer reach `dst` (as the peer addressed it, before
    /// [`Policy::map_destination`]) on `port` (`None` for ICMP)?
    pub fn check(&self, dst: IpAddr, port: Option<u16>) -> Result<(), Denial> {
        if self.host_address == Some(dst) {
            return Ok(());
        }
        let dst = dst.to_canonical();
        if self.deny.iter().any(|rule| rule.matches(dst, port)) {
            return Err(Denial::Explicit);
        }
        if self.allow.iter().any(|rule| rule.matches(dst, port)) {
            return Ok(());
        }
        if self.default_deny.iter().any(|rule| rule.matches(dst, port))
            || self.host_interfaces.contains(&dst)
        {
            return Err(Denial::Default);
        }
        Ok(())
    }

    /// The inverse of [`Policy::map_destination`] for the source of a reply:
    /// the host's loopback, seen from inside the tunnel, is the
    /// `--host-address`.
    pub fn unmap_source(&self, src: IpAddr) -> IpAddr {
        match self.host_address {
            Some(host) if src.is_loopback() && src.is_ipv4() == host.is_ipv4() => host,
            _ => src,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn rules(texts: &[&str]) -> Vec<Rule> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn default_policy() -> Policy {
        Policy::new(&[ip("198.18.1.1"), ip("fd00:1::1")], vec![], vec![], None)
    }

    #[test]
    fn defaults_deny_the_host_itself_and_special_ranges() {
        let policy = default_policy();
        for denied in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.251",
            "ff02::1",
            "255.255.255.255",
            "198.18.1.1",
            "fd00:1::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert_eq!(
                policy.check(ip(denied), Some(80)),
                Err(Denial::Default),
                "{denied}"
            );
        }
        for allowed in [
            "198.18.2.2",
            "8.8.8.8",
            "fd00:2::2",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            assert_eq!(policy.check(ip(allowed), Some(80)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn allow_opens_a_default_denial_and_deny_wins_over_allow() {
        let policy = Policy::new(
            &[],
            rules(&["127.0.0.0/8"]),
            rules(&["127.0.0.1/32:22", "198.18.2.0/24:1000-2000"]),
            None,
        );
        assert_eq!(policy.check(ip("127.0.0.1"), Some(80)), Ok(()));
        assert_eq!(
            policy.check(ip("127.0.0.1"), Some(22)),
            Err(Denial::Explicit)
        );
        assert_eq!(
            policy.check(ip("198.18.2.9"), Some(1500)),
            Err(Denial::Explicit)
        );
        assert_eq!(policy.check(ip("198.18.2.9"), Some(999)), Ok(()));
        assert_eq!(policy.check(ip("198.18.2.9"), None), Ok(()));
    }

    #[test]
    fn port_rules_do_not_match_portless_traffic() {
        let policy = Policy::new(&[], rules(&["127.0.0.1/32:8080"]), vec![], None);
        assert_eq!(policy.check(ip("127.0.0.1"), Some(8080)), Ok(()));
        assert_eq!(policy.check(ip("127.0.0.1"), None), Err(Denial::Default));
    }

    #[test]
    fn host_address_maps_to_loopback_and_is_allowed() {
        let policy = Policy::new(&[], vec![], vec![], Some(ip("10.0.2.2")));
        assert_eq!(policy.check(ip("10.0.2.2"), Some(22)), Ok(()));
        assert_eq!(policy.map_destination(ip("10.0.2.2")), ip("127.0.0.1"));
        assert_eq!(policy.map_destination(ip("10.0.2.3")), ip("10.0.2.3"));
        assert_eq!(policy.unmap_source(ip("127.0.0.1")), ip("10.0.2.2"));
        assert_eq!(policy.unmap_source(ip("::1")), ip("::1"));
        assert_eq!(policy.unmap_source(ip("198.18.2.2")), ip("198.18.2.2"));
        // Loopback itself stays denied.
        assert_eq!(
            policy.check(ip("127.0.0.1"), Some(22)),
            Err(Denial::Default)
        );

        let v6 = Policy::new(&[], vec![], vec![], Some(ip("fd00::2")));
        assert_eq!(v6.map_destination(ip("fd00::2")), ip("::1"));
    }

    #[test]
    fn allow_all_allows_loopback() {
        assert_eq!(Policy::allow_all().check(ip("127.0.0.1"), Some(1)), Ok(()));
    }

    #[test]
    fn rule_syntax() {
        let rule: Rule = "10.0.0.0/8".parse().unwrap();
        assert_eq!(rule.ports, None);
        assert_eq!(rule.to_string(), "10.0.0.0/8");
        let rule: Rule = "10.1.2.3:443".parse().unwrap();
        assert_eq!(rule.network, "10.1.2.3/32".parse::<IpNetwork>().unwrap());
        assert_eq!(rule.ports, Some(443..=443));
        let rule: Rule = "[fd00::/8]:1000-2000".parse().unwrap();
        assert_eq!(rule.ports, Some(1000..=2000));
        assert_eq!(rule.to_string(), "[fd00::/8]:1000-2000");
        let rule: Rule = "fd00::/8".parse().unwrap();
        assert_eq!(rule.ports, None);
        let rule: Rule = "[::1]".parse().unwrap();
        assert_eq!(rule.network, "::1/128".parse::<IpNetwork>().unwrap());
    }

    #[test]
    fn rule_errors_say_what_is_wrong() {
        for (text, why) in [
            ("nonsense", "not an IP network"),
            ("10.0.0.0/8:http", "not a port"),
            ("10.0.0.0/8:90-80", "runs backwards"),
            ("[fd00::/8", "missing `]`"),
            ("[fd00::/8]80", "expected `:`"),
            ("10.0.0.0/33", "not an IP network"),
        ] {
            let error = text.parse::<Rule>().unwrap_err().to_string();
            assert!(error.contains(why), "{text}: {error}");
        }
    }
}
