package main

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spf13/pflag"
)

// listValue is a comma-separated list flag. The first use replaces the
// default, later uses append, and an empty value empties the list
// (--proxy-gid= means no gid).
type listValue[T any] struct {
	list    *[]T
	parse   func(string) (T, error)
	format  func(T) string
	typ     string
	changed bool
}

var _ pflag.Value = (*listValue[uint16])(nil)

func (v *listValue[T]) Set(s string) error {
	if !v.changed {
		*v.list = nil
		v.changed = true
	}
	if strings.TrimSpace(s) == "" {
		*v.list = nil
		return nil
	}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			return errors.New("empty element in the list")
		}
		x, err := v.parse(f)
		if err != nil {
			return err
		}
		*v.list = append(*v.list, x)
	}
	return nil
}

func (v *listValue[T]) String() string {
	if v.list == nil {
		return ""
	}
	parts := make([]string, 0, len(*v.list))
	for _, x := range *v.list {
		parts = append(parts, v.format(x))
	}
	return strings.Join(parts, ",")
}

func (v *listValue[T]) Type() string { return v.typ }

func portsFlag(list *[]uint16) *listValue[uint16] {
	return &listValue[uint16]{list: list, parse: parsePort, typ: "ports",
		format: func(p uint16) string { return strconv.Itoa(int(p)) }}
}

func idsFlag(list *[]uint32, what string) *listValue[uint32] {
	return &listValue[uint32]{list: list, typ: what + "s",
		parse: func(s string) (uint32, error) {
			id, err := strconv.ParseUint(s, 10, 32)
			if err != nil || id == 1<<32-1 {
				return 0, fmt.Errorf("%q is not a %s (0 to 4294967294)", s, what)
			}
			return uint32(id), nil
		},
		format: func(id uint32) string { return strconv.FormatUint(uint64(id), 10) }}
}

func addrsFlag(list *[]netip.Addr) *listValue[netip.Addr] {
	return &listValue[netip.Addr]{list: list, typ: "IPs", format: netip.Addr.String,
		parse: func(s string) (netip.Addr, error) {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
			}
			return a, nil
		}}
}

func prefixesFlag(list *[]netip.Prefix) *listValue[netip.Prefix] {
	return &listValue[netip.Prefix]{list: list, typ: "CIDRs", format: netip.Prefix.String,
		parse: func(s string) (netip.Prefix, error) {
			if a, err := netip.ParseAddr(s); err == nil {
				return netip.PrefixFrom(a, a.BitLen()), nil // one host
			}
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (like 10.0.0.0/8) or an IP address", s)
			}
			return p, nil
		}}
}

// portValue is a single port flag: 1 to 65535, or 0 where allowZero.
type portValue struct {
	p         *uint16
	allowZero bool
}

func (v portValue) Set(s string) error {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	switch {
	case err != nil:
		return fmt.Errorf("%q is not a port (1 to 65535)", s)
	case n == 0 && !v.allowZero:
		return errors.New("0 is not a port (1 to 65535)")
	}
	*v.p = uint16(n)
	return nil
}

func (v portValue) String() string {
	if v.p == nil {
		return ""
	}
	return strconv.Itoa(int(*v.p))
}

func (v portValue) Type() string { return "port" }

func parsePort(s string) (uint16, error) {
	var p uint16
	if err := (portValue{p: &p}).Set(s); err != nil {
		return 0, err
	}
	return p, nil
}
