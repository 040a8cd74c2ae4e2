//! The service virtual IP on this host: add it to an interface over
//! netlink, announce it with bursts of gratuitous ARP (IPv4) or unsolicited
//! neighbour advertisements (IPv6), and remove it. Only this module needs
//! CAP_NET_ADMIN (netlink) and CAP_NET_RAW (the raw channel, opened
//! non-promiscuous); workers never touch it.
//!
//! Leases (who may hold the VIP, and until when) are decided elsewhere; this
//! module only carries the decision out.

pub mod frames;

use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use pnet::datalink::{self, Channel, Config, NetworkInterface};
use rtnetlink::packet_route::address::AddressHeaderFlags;

use tracing::Instrument;

use self::frames::GarpForm;

/// A VIP and how to announce it (keepalived's garp_master_repeat/_delay).
#[derive(Debug, Clone)]
pub struct Vip {
    /// Interface to hold it on.
    pub iface: String,
    /// The address.
    pub addr: IpAddr,
    /// Prefix length it is added with.
    pub prefix: u8,
    /// Announcements per burst (each sends both ARP forms, or one NA).
    pub count: u32,
    /// Delay between announcements of a burst.
    pub delay: Duration,
}

/// Why a VIP operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// Bad address or prefix.
    #[error("invalid VIP {0}")]
    Invalid(String),
    /// No such interface.
    #[error("interface {0:?} not found")]
    NoInterface(String),
    /// Netlink failed (often: not root / no CAP_NET_ADMIN).
    #[error("netlink {op} {addr} on {iface}: {message} (needs CAP_NET_ADMIN)")]
    Netlink {
        /// What was attempted.
        op: &'static str,
        /// The address.
        addr: IpAddr,
        /// The interface.
        iface: String,
        /// The error.
        message: String,
    },
    /// The raw channel failed (often: no CAP_NET_RAW).
    #[error("raw send on {iface}: {message} (needs CAP_NET_RAW)")]
    Raw {
        /// The interface.
        iface: String,
        /// The error.
        message: String,
    },
}

/// Parses `198.18.0.100/24` or `2001:2::100/64` (a bare address gets /32 or /128).
pub fn parse_vip(s: &str) -> Result<(IpAddr, u8), VipError> {
    let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
    let addr: IpAddr = a
        .parse()
        .map_err(|e| VipError::Invalid(format!("{s:?}: {e}")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| (1..=max).contains(p))
            .ok_or_else(|| VipError::Invalid(format!("{s:?}: prefix must be 1..={max}")))?,
    };
    Ok((addr, prefix))
}

/// Whether interface `name` exists on this host.
pub fn interface_exists(name: &str) -> bool {
    interface(name).is_ok()
}

fn interface(name: &str) -> Result<NetworkInterface, VipError> {
    datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| VipError::NoInterface(name.to_string()))
}

async fn netlink() -> Result<rtnetlink::Handle, std::io::Error> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    // The connection task lives as long as the handle is used: it ends when
    // the handle is dropped at the end of the operation.
    tokio::spawn(connection);
    Ok(handle)
}

impl Vip {
    fn nl_err(&self, op: &'static str, e: impl std::fmt::Display) -> VipError {
        VipError::Netlink {
            op,
            addr: self.addr,
            iface: self.iface.clone(),
            message: e.to_string(),
        }
    }

    async fn link_index(&self, handle: &rtnetlink::Handle) -> Result<u32, VipError> {
        handle
            .link()
            .get()
            .match_name(self.iface.clone())
            .execute()
            .try_next()
            .await
            .map_err(|_| VipError::NoInterface(self.iface.clone()))?
            .map(|l| l.header.index)
            .ok_or_else(|| VipError::NoInterface(self.iface.clone()))
    }

    /// Adds the address (idempotent; IPv6 without duplicate address
    /// detection, which would delay it by a second) and announces it.
    pub async fn acquire(&self) -> Result<(), VipError> {
        let span = tracing::info_span!("vip_acquire", vip = %self.addr, iface = %self.iface);
        self.acquire_inner().instrument(span).await
    }

    /// Adds the address to the interface over netlink, without announcing
    /// it (the caller sends the burst, for example in the background).
    pub async fn add(&self) -> Result<(), VipError> {
        let span = tracing::info_span!("vip_add", vip = %self.addr, iface = %self.iface);
        self.add_inner().instrument(span).await
    }

    async fn acquire_inner(&self) -> Result<(), VipError> {
        self.add_inner().await?;
        self.announce().await
    }

    async fn add_inner(&self) -> Result<(), VipError> {
        let handle = netlink().await.map_err(|e| self.nl_err("connect", e))?;
        let index = self.link_index(&handle).await?;
        let mut req = handle
            .address()
            .add(index, self.addr, self.prefix)
            .replace();
        if self.addr.is_ipv6() {
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        req.execute().await.map_err(|e| self.nl_err("add", e))?;
        tracing::info!("VIP added");
        Ok(())
    }

    /// Removes the address (absent already is fine).
    pub async fn release(&self) -> Result<(), VipError> {
        let handle = netlink().await.map_err(|e| self.nl_err("connect", e))?;
        let index = self.link_index(&handle).await?;
        let found: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(self.addr)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.nl_err("list", e))?;
        for msg in found {
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|e| self.nl_err("delete", e))?;
        }
        tracing::info!(vip = %self.addr, iface = %self.iface, "VIP removed");
        Ok(())
    }

    /// Sends one burst of announcements.
    pub async fn announce(&self) -> Result<(), VipError> {
        self.prepare()?.start()?.await
    }

    /// Looks up the interface's MAC address and builds the frames, so that
    /// a later burst's first announcement leaves the moment it is started
    /// ([`Announcement::start`]).
    pub fn prepare(&self) -> Result<Announcement, VipError> {
        let iface = interface(&self.iface)?;
        let mac = iface.mac.ok_or_else(|| VipError::Raw {
            iface: self.iface.clone(),
            message: "interface has no MAC address".into(),
        })?;
        let frames: Vec<Vec<u8>> = match self.addr {
            IpAddr::V4(v4) => vec![
                frames::garp(mac, v4, GarpForm::Request),
                frames::garp(mac, v4, GarpForm::Reply),
            ],
            IpAddr::V6(v6) => vec![frames::unsolicited_na(mac, v6)],
        };
        Ok(Announcement {
            iface,
            frames,
            count: self.count,
            delay: self.delay,
        })
    }
}

/// A VIP's announcement burst, prepared ([`Vip::prepare`]): the interface
/// found and the frames built. Until it is started no socket is open.
#[derive(Debug, Clone)]
pub struct Announcement {
    iface: NetworkInterface,
    frames: Vec<Vec<u8>>,
    count: u32,
    delay: Duration,
}

impl Announcement {
    /// Whether it announces with these burst settings.
    pub fn is_for(&self, count: u32, delay: Duration) -> bool {
        self.count == count && self.delay == delay
    }

    /// Opens the raw channel and sends the first announcement now, before
    /// returning; the returned future sends the rest of the burst.
    pub fn start(
        self,
    ) -> Result<impl std::future::Future<Output = Result<(), VipError>> + Send, VipError> {
        let config = Config {
            promiscuous: false,
            ..Config::default()
        };
        let name = self.iface.name.clone();
        let raw = move |message: String| VipError::Raw {
            iface: name.clone(),
            message,
        };
        let mut tx = match datalink::channel(&self.iface, config) {
            Ok(Channel::Ethernet(tx, _rx)) => tx,
            Ok(_) => return Err(raw("not an Ethernet channel".into())),
            Err(e) => return Err(raw(e.to_string())),
        };
        let mut send = move || -> Result<(), VipError> {
            for f in &self.frames {
                match tx.send_to(f, None) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Err(raw(e.to_string())),
                    None => return Err(raw("send failed".into())),
                }
            }
            Ok(())
        };
        send()?;
        let (count, delay) = (self.count.max(1), self.delay);
        Ok(async move {
            for _ in 1..count {
                tokio::time::sleep(delay).await;
                send()?;
            }
            tracing::info!(count, "VIP announced");
            Ok(())
        })
    }
}
