//! Announcement frames, built as bytes (pure, unit-tested):
//!
//! - gratuitous ARP, **request form**: op 1, sender = target = VIP, target
//!   MAC zero, to broadcast;
//! - gratuitous ARP, **reply form**: op 2, sender = target = VIP, target MAC
//!   = sender MAC, to broadcast. Linux treats only these two as gratuitous
//!   and lets them replace a neighbour entry inside its 1 s locktime; a reply
//!   whose target MAC is ff:ff:ff:ff:ff:ff is ignored within locktime;
//! - IPv6 **unsolicited neighbour advertisement**: to ff02::1 (MAC
//!   33:33:00:00:00:01), hop limit 255, Override flag set, Solicited clear,
//!   with the target link-layer address option.

use std::net::{Ipv4Addr, Ipv6Addr};

use pnet::packet::arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket};
use pnet::packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet::packet::icmpv6::ndp::{
    MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags,
};
use pnet::packet::icmpv6::{self, Icmpv6Packet, Icmpv6Types};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv6::MutableIpv6Packet;
use pnet::util::MacAddr;

/// Ethernet header + ARP body.
const ARP_FRAME: usize = 14 + 28;
/// Ethernet + IPv6 header + NA (24) + target link-layer option (8).
const NA_FRAME: usize = 14 + 40 + 32;

/// Which gratuitous ARP form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarpForm {
    /// ARP request, target MAC zero.
    Request,
    /// ARP reply, target MAC = sender MAC.
    Reply,
}

/// A gratuitous ARP frame announcing that `vip` is at `mac`.
pub fn garp(mac: MacAddr, vip: Ipv4Addr, form: GarpForm) -> Vec<u8> {
    let mut buf = vec![0u8; ARP_FRAME];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("frame fits");
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(mac);
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut buf[14..]).expect("arp fits");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_sender_hw_addr(mac);
    arp.set_sender_proto_addr(vip);
    arp.set_target_proto_addr(vip);
    match form {
        GarpForm::Request => {
            arp.set_operation(ArpOperations::Request);
            arp.set_target_hw_addr(MacAddr::zero());
        }
        GarpForm::Reply => {
            arp.set_operation(ArpOperations::Reply);
            arp.set_target_hw_addr(mac);
        }
    }
    buf
}

/// An unsolicited neighbour advertisement for `vip` at `mac`, to all nodes.
pub fn unsolicited_na(mac: MacAddr, vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut buf = vec![0u8; NA_FRAME];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("frame fits");
        eth.set_destination(MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        eth.set_source(mac);
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    {
        let mut ip = MutableIpv6Packet::new(&mut buf[14..]).expect("ipv6 fits");
        ip.set_version(6);
        ip.set_payload_length(32);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(255);
        ip.set_source(vip);
        ip.set_destination(all_nodes);
    }
    {
        let mut na = MutableNeighborAdvertPacket::new(&mut buf[54..]).expect("na fits");
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_target_addr(vip);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1,
            data: mac.octets().to_vec(),
        }]);
    }
    let checksum = {
        let icmp = Icmpv6Packet::new(&buf[54..]).expect("icmpv6");
        icmpv6::checksum(&icmp, &vip, &all_nodes)
    };
    buf[56..58].copy_from_slice(&checksum.to_be_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::packet::arp::ArpPacket;
    use pnet::packet::ethernet::EthernetPacket;
    use pnet::packet::icmpv6::ndp::NeighborAdvertPacket;
    use pnet::packet::Packet;

    const MAC: MacAddr = MacAddr(0x02, 0, 0x5e, 0, 0, 0x42);

    #[test]
    fn test_garp_request_and_reply_forms() {
        let vip = Ipv4Addr::new(198, 18, 0, 100);
        for (form, op, target_mac) in [
            (GarpForm::Request, ArpOperations::Request, MacAddr::zero()),
            (GarpForm::Reply, ArpOperations::Reply, MAC),
        ] {
            let f = garp(MAC, vip, form);
            let eth = EthernetPacket::new(&f).expect("eth");
            assert_eq!(eth.get_destination(), MacAddr::broadcast());
            assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
            let arp = ArpPacket::new(eth.payload()).expect("arp");
            assert_eq!(arp.get_operation(), op);
            assert_eq!(
                (arp.get_sender_proto_addr(), arp.get_target_proto_addr()),
                (vip, vip)
            );
            assert_eq!(arp.get_sender_hw_addr(), MAC);
            assert_eq!(arp.get_target_hw_addr(), target_mac, "{form:?}");
        }
    }

    #[test]
    fn test_unsolicited_na_has_override_and_valid_checksum() {
        let vip: Ipv6Addr = "2001:2::100".parse().expect("v6");
        let f = unsolicited_na(MAC, vip);
        let eth = EthernetPacket::new(&f).expect("eth");
        assert_eq!(eth.get_destination(), MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        assert_eq!(f[14 + 7], 255, "hop limit 255 or receivers drop it");
        let na = NeighborAdvertPacket::new(&f[54..]).expect("na");
        assert_eq!(na.get_flags(), NeighborAdvertFlags::Override);
        assert_eq!(na.get_target_addr(), vip);
        assert_eq!(na.get_options()[0].data, MAC.octets().to_vec());
        let all_nodes: Ipv6Addr = "ff02::1".parse().expect("v6");
        let icmp = Icmpv6Packet::new(&f[54..]).expect("icmp");
        assert_eq!(
            icmpv6::checksum(&icmp, &vip, &all_nodes),
            icmp.get_checksum()
        );
        assert_ne!(icmp.get_checksum(), 0);
    }
}
