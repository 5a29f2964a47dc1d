// Command pki writes the certificates and keys a throw-away test control plane needs:
// a CA, the API server's serving certificate for 127.0.0.1, client certificates (one
// per -client NAME=ORG entry, ORG may be empty), and the service-account signing key.
// Existing files are left alone, so a restarted cluster keeps its identities.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"log"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

type clients []string

func (c *clients) String() string     { return strings.Join(*c, ",") }
func (c *clients) Set(v string) error { *c = append(*c, v); return nil }

func main() {
	dir := flag.String("dir", "", "output directory")
	var wanted clients
	flag.Var(&wanted, "client", "client certificate NAME=ORG (repeatable; ORG may be empty)")
	flag.Parse()
	if *dir == "" {
		log.Fatal("-dir is required")
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		log.Fatal(err)
	}
	caKey, caCert := loadOrCreateCA(*dir)
	issue(*dir, "apiserver", caKey, caCert, pkix.Name{CommonName: "kube-apiserver"}, true)
	for _, entry := range wanted {
		name, org, _ := strings.Cut(entry, "=")
		subject := pkix.Name{CommonName: name}
		if org != "" {
			subject.Organization = []string{org}
		}
		issue(*dir, "client-"+strings.ReplaceAll(name, ":", "-"), caKey, caCert, subject, false)
	}
	saKey := filepath.Join(*dir, "sa.key")
	if !exists(saKey) {
		key := newKey()
		writeKey(saKey, key)
		der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err != nil {
			log.Fatal(err)
		}
		writePEM(filepath.Join(*dir, "sa.pub"), "PUBLIC KEY", der)
	}
}

func exists(path string) bool { _, err := os.Stat(path); return err == nil }

func newKey() *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	return key
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		log.Fatal(err)
	}
	return n
}

func loadOrCreateCA(dir string) (*ecdsa.PrivateKey, *x509.Certificate) {
	certPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	if !exists(certPath) || !exists(keyPath) {
		key := newKey()
		template := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "nodemem-test-ca"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().AddDate(10, 0, 0),
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
			BasicConstraintsValid: true,
			IsCA:                  true,
		}
		der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
		if err != nil {
			log.Fatal(err)
		}
		writeKey(keyPath, key)
		writePEM(certPath, "CERTIFICATE", der)
	}
	return readKey(keyPath), readCert(certPath)
}

func issue(dir, base string, caKey *ecdsa.PrivateKey, ca *x509.Certificate, subject pkix.Name, server bool) {
	certPath, keyPath := filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
	if exists(certPath) && exists(keyPath) {
		return
	}
	key := newKey()
	template := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		template.IPAddresses = []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")}
		template.DNSNames = []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		log.Fatal(err)
	}
	writeKey(keyPath, key)
	writePEM(certPath, "CERTIFICATE", der)
}

func writeKey(path string, key *ecdsa.PrivateKey) {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		log.Fatal(err)
	}
	writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, kind string, der []byte) {
	data := pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
	if err := os.WriteFile(path, data, 0o600); err != nil {
		log.Fatal(err)
	}
}

func readPEM(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		log.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		log.Fatalf("%s: no PEM block", path)
	}
	return block.Bytes
}

func readKey(path string) *ecdsa.PrivateKey {
	key, err := x509.ParseECPrivateKey(readPEM(path))
	if err != nil {
		log.Fatalf("%s: %v", path, err)
	}
	return key
}

func readCert(path string) *x509.Certificate {
	cert, err := x509.ParseCertificate(readPEM(path))
	if err != nil {
		log.Fatalf("%s: %v", path, err)
	}
	return cert
}
