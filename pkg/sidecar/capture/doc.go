// Package capture sends a pod's traffic through its sidecar: iptables
// REDIRECT rules in the pod's network namespace, as Istio's istio-iptables
// writes them, and OriginalDst to learn where a redirected connection was
// going. `sidecar iptables` (cmd/sidecar) applies the rules as the pod's
// init step; the sidecar's listeners call OriginalDst.
//
// # Where packets go
//
// The capture lives in the nat table, in chains Isthmus owns (ChainInbound,
// ChainInRedirect, ChainOutput, ChainRedirect), reached by one jump from
// PREROUTING and one from OUTPUT: iptables always, ip6tables too with
// Config.IPv6. The nat table sees only the first packet of a connection
// (or of a UDP flow); conntrack rewrites the rest, and the replies, to
// match.
//
//	inbound:   peer → pod IP:port
//	           PREROUTING → ISTHMUS_INBOUND
//	           sidecar or excluded port?  RETURN: straight to the socket
//	           otherwise → ISTHMUS_IN_REDIRECT → REDIRECT :15006
//	outbound:  app → anywhere
//	           OUTPUT → ISTHMUS_OUTPUT, in order:
//	           port 53, UDP or TCP, from the sidecar's uid/gid → RETURN
//	           port 53, UDP or TCP (to the DNS servers, or any)  → REDIRECT 127.0.0.1:15053
//	           not TCP                                          → RETURN
//	           from 127.0.0.6 on lo (Envoy's inbound passthrough) → RETURN
//	           the sidecar to its own pod IP (not 127.0.0.1) on lo → ISTHMUS_IN_REDIRECT
//	           anything else on lo (the app calling itself)     → RETURN
//	           from the sidecar's uid/gid                       → RETURN
//	           to 127.0.0.1, an excluded CIDR or port           → RETURN
//	           otherwise → ISTHMUS_REDIRECT → REDIRECT 127.0.0.1:15001
//
// REDIRECT of a locally generated packet sends it to 127.0.0.1 (::1), so
// the outbound and DNS listeners may bind loopback; REDIRECT in PREROUTING
// sends it to the address of the interface it came in on, so the inbound
// listener binds every address. The sidecar's own connections are left
// alone by uid and gid (iptables' owner match), which is why it must run
// as a uid or gid of its own.
//
// Without Config.IPv6 (the default) IPv6 is not captured, and inbound IPv6
// must not reach the app around the sidecar's mTLS and authorization in
// a dual-stack pod. So ip6tables' filter table gets ChainInput6Block,
// reached from INPUT, as Istio does:
//
//	inbound IPv6: INPUT → ISTHMUS_INPUT6_BLOCK
//	              on lo, a reply (ESTABLISHED, RELATED), ICMPv6 → ACCEPT
//	              INVALID → DROP; TCP → REJECT with a reset; rest → REJECT
//
// The app's own outbound IPv6 goes direct. Where ip6tables cannot be used
// (not installed, or a kernel without IPv6), Apply leaves IPv6 alone and
// says so (Result.IPv6Skipped) if no interface but loopback has an IPv6
// address, since IPv6 cannot reach the pod then; if one has, it fails,
// so that the pod does not start open.
//
// # Applying
//
// Rules renders the iptables-restore input; Apply loads it with one
// iptables-restore --noflush per table, which the kernel commits whole or
// not at all, and restores the tables it changed if a later one fails.
// Declaring a chain in that input flushes it, so Apply is idempotent and a
// changed Config replaces the old rules (turning Config.IPv6 on removes
// the IPv6 block, turning it off removes the IPv6 capture); the jumps are
// added only when they are not there exactly once already. Remove takes
// out the jumps and the chains, of both families and both tables, and
// nothing else.
package capture
