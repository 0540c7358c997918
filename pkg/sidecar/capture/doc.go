// Package capture sends a pod's traffic through its sidecar: iptables
// REDIRECT rules in the pod's network namespace, as Istio's istio-iptables
// writes them, and OriginalDst to learn where a redirected connection was
// going. `sidecar iptables` (cmd/sidecar) applies the rules as the pod's
// init step; the sidecar's listeners call OriginalDst.
//
// # Where packets go
//
// All rules live in the nat table, in chains Isthmus owns (ChainInbound,
// ChainInRedirect, ChainOutput, ChainRedirect), reached by one jump from
// PREROUTING and one from OUTPUT. The nat table sees only the first packet
// of a connection (or of a UDP flow); conntrack rewrites the rest, and the
// replies, to match.
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
// # Applying
//
// Rules renders the iptables-restore input; Apply loads it with one
// iptables-restore --noflush per address family, which the kernel commits
// whole or not at all. Declaring a chain in that input flushes it, so
// Apply is idempotent and a changed Config replaces the old rules; the two
// jumps are added only when they are not there already. Remove takes out
// the jumps and the chains and nothing else.
package capture
