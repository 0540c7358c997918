package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h),
// which x/sys/unix does not define.
const ip6tSOOriginalDst = 80

// ErrNoOriginalDst means conntrack knows nothing of the connection: it was
// not redirected, and no NAT rule in the namespace made conntrack track
// it. A proxy then treats the connection's local address as its
// destination.
var ErrNoOriginalDst = errors.New("no original destination: conntrack does not track this connection")

// OriginalDst returns where the client sent a connection that an iptables
// REDIRECT delivered to this socket, from conntrack (SO_ORIGINAL_DST, or
// IP6T_SO_ORIGINAL_DST for IPv6). For a tracked connection that was not
// redirected it is the connection's own local address. An IPv4 connection
// accepted on a dual-stack listener is asked as IPv4 and answered as an
// IPv4 address.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok || local == nil {
		return netip.AddrPort{}, errors.New("original destination: connection has no local TCP address")
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	var dst netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if local.IP.To4() != nil {
			dst, serr = originalDst4(int(fd))
		} else {
			dst, serr = originalDst6(int(fd))
		}
	})
	if err == nil {
		err = serr
	}
	if errors.Is(err, unix.ENOENT) {
		return netip.AddrPort{}, fmt.Errorf("%w (%s to %s)", ErrNoOriginalDst, c.RemoteAddr(), local)
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination of %s to %s: %w", c.RemoteAddr(), local, err)
	}
	return dst, nil
}

func originalDst4(fd int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet4
	if err := getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", err)
	}
	if sa.Family != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: address family %d, want AF_INET", sa.Family)
	}
	return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port(sa.Port)), nil
}

func originalDst6(fd int) (netip.AddrPort, error) {
	var sa unix.RawSockaddrInet6
	if err := getsockopt(fd, unix.SOL_IPV6, ip6tSOOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt IP6T_SO_ORIGINAL_DST: %w", err)
	}
	if sa.Family != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("getsockopt IP6T_SO_ORIGINAL_DST: address family %d, want AF_INET6", sa.Family)
	}
	a := netip.AddrFrom16(sa.Addr)
	if sa.Scope_id != 0 {
		// A numeric zone: net.Dial accepts it for link-local addresses.
		a = a.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
	}
	return netip.AddrPortFrom(a, port(sa.Port)), nil
}

// port converts a sockaddr's port, stored in network byte order.
func port(raw uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], raw)
	return binary.BigEndian.Uint16(b[:])
}

// getsockopt is getsockopt(2) into a struct of size n.
func getsockopt(fd, level, opt int, p unsafe.Pointer, n uintptr) error {
	l := uint32(n)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}
