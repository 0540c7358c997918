package federation

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// tokenPrefix marks an Isthmus peering token and its format version.
const tokenPrefix = "isthmus1."

// maxTokenBytes bounds what Decode reads: a token carries a few roots.
const maxTokenBytes = 64 << 10

// ErrInvalidToken: the token cannot be used; the message says why.
var ErrInvalidToken = errors.New("invalid peering token")

// Token is what `federator token create` prints on the accepting cluster
// and `federator join` consumes on the joining one. It carries no
// credential for any API server; its secret is good for one establishment
// and is stored on the accepting side only as a hash.
type Token struct {
	// ClusterName, TrustDomain and FederatorID identify the accepting
	// cluster and the SPIFFE ID its federator presents.
	ClusterName string `json:"cluster"`
	TrustDomain string `json:"trustDomain"`
	FederatorID string `json:"federatorID"`
	// Addresses reach the accepting cluster's federation endpoint.
	Addresses []string `json:"addresses"`
	// Roots (DER) verify the accepting federator's certificate.
	Roots [][]byte `json:"roots"`
	// Peer is the name the token was created for (the joiner's cluster),
	// and PeerTrustDomain the trust domain it must present.
	Peer            string `json:"peer"`
	PeerTrustDomain string `json:"peerTrustDomain"`
	// ID names the accepting side's record of the token.
	ID string `json:"id"`
	// Secret is the one-time establishment secret.
	Secret string `json:"secret"`
	// Expires is when the accepting side stops honouring the secret.
	Expires time.Time `json:"expires"`
}

// Encode returns the token as one line of text.
func (t Token) Encode() (string, error) {
	b, err := json.Marshal(t)
	if err != nil {
		return "", err
	}
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// DecodeToken parses and validates a token, naming every problem.
func DecodeToken(s string) (Token, error) {
	var t Token
	s = strings.TrimSpace(s)
	if len(s) > maxTokenBytes {
		return t, fmt.Errorf("%w: %d bytes, more than %d", ErrInvalidToken, len(s), maxTokenBytes)
	}
	body, ok := strings.CutPrefix(s, tokenPrefix)
	if !ok {
		return t, fmt.Errorf("%w: it does not start with %q (is it a peering token from `federator token create`?)", ErrInvalidToken, tokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return t, fmt.Errorf("%w: not base64url: %v (was it cut when copied?)", ErrInvalidToken, err)
	}
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			// Cut on a base64 boundary: the encoding held, the JSON ends early.
			return Token{}, fmt.Errorf("%w: it ends early (was it cut when copied?)", ErrInvalidToken)
		}
		return Token{}, fmt.Errorf("%w: %v", ErrInvalidToken, err)
	}
	if err := t.Validate(); err != nil {
		return Token{}, err
	}
	return t, nil
}

// Validate names every problem with a token's fields.
func (t Token) Validate() error {
	var errs []error
	if msgs := validation.IsDNS1123Label(t.ClusterName); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("cluster %q: %s", t.ClusterName, strings.Join(msgs, "; ")))
	}
	if msgs := validation.IsDNS1123Label(t.Peer); len(msgs) > 0 {
		errs = append(errs, fmt.Errorf("peer %q: %s", t.Peer, strings.Join(msgs, "; ")))
	}
	if _, err := spiffeid.TrustDomainFromString(t.PeerTrustDomain); err != nil {
		errs = append(errs, fmt.Errorf("peer trust domain %q: %v", t.PeerTrustDomain, err))
	}
	td, err := spiffeid.TrustDomainFromString(t.TrustDomain)
	if err != nil {
		errs = append(errs, fmt.Errorf("trust domain %q: %v", t.TrustDomain, err))
	}
	if id, err := spiffeid.FromString(t.FederatorID); err != nil {
		errs = append(errs, fmt.Errorf("federator ID %q: %v", t.FederatorID, err))
	} else if !td.IsZero() && !id.MemberOf(td) {
		errs = append(errs, fmt.Errorf("federator ID %s is not in trust domain %s", id, td))
	}
	if len(t.Addresses) == 0 {
		errs = append(errs, errors.New("no addresses"))
	}
	for _, a := range t.Addresses {
		if err := CheckAddress(a); err != nil {
			errs = append(errs, err)
		}
	}
	if len(t.Roots) == 0 {
		errs = append(errs, errors.New("no root certificates"))
	}
	for i, r := range t.Roots {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			errs = append(errs, fmt.Errorf("roots[%d]: %v", i, err))
		} else if !c.IsCA {
			errs = append(errs, fmt.Errorf("roots[%d] (%s) is not a CA certificate", i, c.Subject))
		}
	}
	if len(t.ID) != 16 || !isHex(t.ID) {
		errs = append(errs, errors.New("malformed token ID"))
	}
	if raw, err := base64.RawURLEncoding.DecodeString(t.Secret); err != nil || len(raw) != secretBytes {
		errs = append(errs, errors.New("malformed secret"))
	}
	if t.Expires.IsZero() {
		errs = append(errs, errors.New("no expiry"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidToken, err)
	}
	return nil
}

// Expired reports whether the token's secret is no longer honoured at now.
func (t Token) Expired(now time.Time) bool { return !now.Before(t.Expires) }

// RootCertificates parses the roots (Validate has checked them).
func (t Token) RootCertificates() []*x509.Certificate {
	out := make([]*x509.Certificate, 0, len(t.Roots))
	for _, r := range t.Roots {
		if c, err := x509.ParseCertificate(r); err == nil {
			out = append(out, c)
		}
	}
	return out
}

// CheckAddress checks a host:port address as peers and tokens carry it:
// an IP that can be dialled (CheckDialIP) or a DNS name, and a port.
func CheckAddress(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("address %q: %v", a, err)
	}
	if host == "" {
		return fmt.Errorf("address %q: no host", a)
	}
	if ip := net.ParseIP(host); ip != nil {
		addr, _ := netip.AddrFromSlice(ip)
		if err := CheckDialIP(addr); err != nil {
			return fmt.Errorf("address %q: %w", a, err)
		}
	} else if msgs := validation.IsDNS1123Subdomain(host); len(msgs) > 0 {
		return fmt.Errorf("address %q: host is neither an IP nor a DNS name", a)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		return fmt.Errorf("address %q: port %q is not a number", a, port)
	}
	if msgs := validation.IsValidPortNum(n); len(msgs) > 0 {
		return fmt.Errorf("address %q: port %s", a, strings.Join(msgs, "; "))
	}
	return nil
}

// CheckDialIP refuses an IP address nothing is reached at: the
// unspecified address (0.0.0.0 or ::, the dialling host itself) and the
// multicast ones, IPv4-mapped too.
func CheckDialIP(a netip.Addr) error {
	if a = a.Unmap(); a.IsUnspecified() || a.IsMulticast() {
		return fmt.Errorf("%s is not a unicast address", a)
	}
	return nil
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

const secretBytes = 32

// newSecret returns a token ID and a one-time secret.
func newSecret() (id, secret string, err error) {
	var idb [8]byte
	var sb [secretBytes]byte
	if _, err := rand.Read(idb[:]); err != nil {
		return "", "", err
	}
	if _, err := rand.Read(sb[:]); err != nil {
		return "", "", err
	}
	return hex.EncodeToString(idb[:]), base64.RawURLEncoding.EncodeToString(sb[:]), nil
}

// HashSecret is what the accepting side stores instead of the secret.
func HashSecret(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// SecretMatches compares a presented secret with a stored hash in
// constant time.
func SecretMatches(secret, storedHash string) bool {
	got := HashSecret(secret)
	return subtle.ConstantTimeCompare([]byte(got), []byte(storedHash)) == 1
}
