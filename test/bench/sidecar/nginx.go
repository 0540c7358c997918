package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// nginxBackName is the name the front nginx verifies the back's
// certificate against (proxy_ssl_name): nginx checks DNS names, not the
// SPIFFE URIs the sidecars check.
const nginxBackName = "back.bench.internal"

// writeNginxPKI makes what the two nginx need for mTLS between them, as
// PEM files in dir: a root (nginx-root.crt), the back's server
// certificate (nginx-back.{crt,key}, DNS nginxBackName) and the front's
// client certificate (nginx-front.{crt,key}). ECDSA P-256, as the
// sidecars' SVIDs.
func writeNginxPKI(dir string) error {
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench nginx root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return err
	}
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		return err
	}
	files := map[string]*pem.Block{"nginx-root.crt": {Type: "CERTIFICATE", Bytes: rootDER}}
	for i, leaf := range []struct {
		name  string
		usage x509.ExtKeyUsage
		dns   []string
	}{{"nginx-back", x509.ExtKeyUsageServerAuth, []string{nginxBackName}}, {"nginx-front", x509.ExtKeyUsageClientAuth, nil}} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: leaf.name},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{leaf.usage}, DNSNames: leaf.dns,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root, key.Public(), rootKey)
		if err != nil {
			return err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		files[leaf.name+".crt"] = &pem.Block{Type: "CERTIFICATE", Bytes: der}
		files[leaf.name+".key"] = &pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(b), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// nginxCommon is the top of both configurations: one worker per core,
// logs and temporary files in dir under the instance's name, no access
// log (the sidecars keep none either), keep-alive connections that are
// never cut for their request count (nginx's default closes one every
// 1,000 requests; the sidecars do not).
func nginxCommon(dir, name string) string {
	return fmt.Sprintf(`worker_processes auto;
worker_rlimit_nofile 65536;
pid %[1]s/%[2]s.pid;
error_log %[1]s/%[2]s-error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path %[1]s/%[2]s-body;
    proxy_temp_path %[1]s/%[2]s-proxy;
    fastcgi_temp_path %[1]s/%[2]s-fastcgi;
    uwsgi_temp_path %[1]s/%[2]s-uwsgi;
    scgi_temp_path %[1]s/%[2]s-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
`, dir, name)
}

// upstreamTLS is the front's client side of mTLS 1.3 to the back, for
// the module whose directives start with prefix (proxy, grpc): its
// certificate, and the back's verified against the root and
// nginxBackName, with session reuse.
func upstreamTLS(prefix, dir string) string {
	return strings.ReplaceAll(fmt.Sprintf(`
            P_ssl_certificate %[1]s/nginx-front.crt;
            P_ssl_certificate_key %[1]s/nginx-front.key;
            P_ssl_trusted_certificate %[1]s/nginx-root.crt;
            P_ssl_verify on;
            P_ssl_name %[2]s;
            P_ssl_server_name on;
            P_ssl_protocols TLSv1.3;
            P_ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
            P_ssl_session_reuse on;`, dir, nginxBackName), "P_", prefix+"_")
}

// upstream is an upstream block of one server with keep-alive
// connections that are never cut for their request count.
func upstream(name, server string) string {
	return fmt.Sprintf(`    upstream %s {
        server %s;
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
`, name, server)
}

// nginxFrontConf is the client side's nginx, proxying over keep-alive
// mTLS 1.3 to the back, verifying its certificate and name: plaintext
// HTTP/1.1 on h1 and h2c (prior knowledge) on h2 with proxy_pass, which
// speaks HTTP/1.1 to the back; h2c on h2Pass with grpc_pass, which
// speaks HTTP/2 to the back's backH2 (any HTTP/2 request, not only
// gRPC).
func nginxFrontConf(dir, h1, h2, h2Pass, back, backH2 string) string {
	return nginxCommon(dir, "front") + upstream("back", back) + upstream("back_h2", backH2) + fmt.Sprintf(`    server {
        listen %[1]s;
        listen %[2]s http2;
        location / {
            proxy_pass https://back;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;%[4]s
        }
    }
    server {
        listen %[3]s http2;
        location / {
            grpc_pass grpcs://back_h2;
            grpc_set_header Host $host;%[5]s
        }
    }
}
`, h1, h2, h2Pass, upstreamTLS("proxy", dir), upstreamTLS("grpc", dir))
}

// nginxBackConf is the server side's nginx: mTLS 1.3 (the client
// certificate required and verified) on listen, proxying over keep-alive
// HTTP/1.1 to the app, and on listenH2, proxying HTTP/2 (h2c) to it. The
// two have an upstream block each: nginx would hand a cached HTTP/2
// connection to proxy_pass and an HTTP/1.1 one to grpc_pass (502s).
func nginxBackConf(dir, listen, listenH2, app string) string {
	return nginxCommon(dir, "back") + upstream("app", app) + upstream("app_h2", app) + fmt.Sprintf(`    ssl_certificate %[1]s/nginx-back.crt;
    ssl_certificate_key %[1]s/nginx-back.key;
    ssl_client_certificate %[1]s/nginx-root.crt;
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
    server {
        listen %[2]s ssl;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }
    }
    server {
        listen %[3]s ssl http2;
        location / {
            grpc_pass grpc://app_h2;
            grpc_set_header Host $host;
        }
    }
}
`, dir, listen, listenH2)
}
