// Package netns gives tests real Linux network namespaces: a [Network] is a
// bridge in a namespace of its own (its router), and every [NS] plugged
// into it gets a veth, an address and a default route through the router.
// Tests then run code inside a namespace ([NS.Do], [NS.Listen],
// [NS.DialContext]) or start processes there ([NS.Start], [NS.Run]), so
// iptables, routes and sockets are the kernel's own, not simulations.
//
// # Layout
//
//	netns <prefix>-<label>-router     the Network's router
//	  lo   up
//	  br0  <gateway>/<bits> (Prefix().Addr()+1), and <gateway6>/64 with IPv6
//	  v0, v1, …  the router's ends of the veths, enslaved to br0
//	netns <prefix>-<label>            one per NS
//	  lo   up
//	  eth0 the next free address of the first Network it joined, default
//	       route via that Network's gateway (and ::/0 via gateway6)
//	  eth1, …  further Networks (Network.Connect): an address, no route
//
// Nothing is created in the namespace the tests run in: no interface, no
// route, no iptables rule. Every link is made inside the harness's own
// namespaces (`ip -n`), and the veth peers are created directly in the
// router's namespace.
//
// # Names
//
// Every namespace is named isthnet<pid>s<seq>-<label>: the pid keeps
// parallel test binaries (go test ./... runs packages in parallel) apart,
// the per-process sequence number keeps parallel tests apart. Interface
// names only need to be unique inside one namespace, so they are fixed
// (br0, eth0, v0 …) and short.
//
// # Cleanliness
//
// Every namespace is deleted in tb.Cleanup, also when the test failed:
// processes still running in it are SIGKILLed (they run in a namespace the
// harness made, so they are the test's), then the name is removed. Deleting
// the namespaces destroys their veths and bridge. The first use in a
// process also deletes namespaces whose name carries the pid of a test
// binary that is gone (killed before its cleanup could run).
//
// # Programs
//
// A benchmark is a program, not a test: [OpenNetwork], [Network.Add] and
// [Open] make the same namespaces without a testing.TB, return an error
// where the test constructors skip or fail, and leave the clean-up to the
// caller's Close (deferred), which deletes them and kills what runs there.
//
// # Privileges
//
// Namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN). Without them
// every constructor skips the test with the reason in its output, so
// callers can fall back to loopback addresses (shared/design/testing.md).
// As root, a missing ip(8) fails the test:
// `make tools` installs iproute2.
package netns
