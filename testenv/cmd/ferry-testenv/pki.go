package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// clusterPKI is what a cluster with real nodes needs (used with --bind-ip or --nodes):
// one CA per cluster that signs the apiserver's serving certificate (so it covers the
// bind IP) and the client certificate the apiserver shows kubelets (logs, exec, node
// proxy). Kubelets trust the same CA as their x509 clientCAFile.
//
// It also signs the client certificate the apiserver shows admission webhooks
// (webhook-client.crt, CN and DNS name WebhookClientName), named in an
// AdmissionConfiguration (admission.yaml) for every webhook: ferry's eviction webhook
// accepts only callers with that certificate.
type clusterPKI struct {
	CA, ServingCert, ServingKey, KubeletClientCert, KubeletClientKey string
	WebhookClientCert, WebhookClientKey, AdmissionConfig             string
}

// WebhookClientName is the identity the apiserver shows admission webhooks.
const WebhookClientName = "kube-apiserver-webhook-client"

func writePKI(dir string, ips []net.IP, dnsNames []string) (*clusterPKI, error) {
	p := &clusterPKI{
		CA:                filepath.Join(dir, "ca.crt"),
		ServingCert:       filepath.Join(dir, "serving.crt"),
		ServingKey:        filepath.Join(dir, "serving.key"),
		KubeletClientCert: filepath.Join(dir, "kubelet-client.crt"),
		KubeletClientKey:  filepath.Join(dir, "kubelet-client.key"),
		WebhookClientCert: filepath.Join(dir, "webhook-client.crt"),
		WebhookClientKey:  filepath.Join(dir, "webhook-client.key"),
		AdmissionConfig:   filepath.Join(dir, "admission.yaml"),
	}
	now := time.Now().Add(-time.Hour)
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "ferry-testenv cluster CA"},
		NotBefore:             now,
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	if err := writePEM(p.CA, "CERTIFICATE", caDER, 0o644); err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, "ca.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(caKey), 0o600); err != nil {
		return nil, err
	}
	issue := func(serial int64, tmpl *x509.Certificate, certPath, keyPath string) error {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore, tmpl.NotAfter = now, now.Add(10*365*24*time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
			return err
		}
		return writePEM(keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), 0o600)
	}
	if err := issue(2, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: ips,
		DNSNames:    dnsNames,
	}, p.ServingCert, p.ServingKey); err != nil {
		return nil, err
	}
	// system:masters: the kubelet's webhook authorizer asks the apiserver, which allows
	// that group everything, so no RBAC binding is needed for logs/exec/proxy.
	if err := issue(3, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.KubeletClientCert, p.KubeletClientKey); err != nil {
		return nil, err
	}
	if err := issue(4, &x509.Certificate{
		Subject:     pkix.Name{CommonName: WebhookClientName},
		DNSNames:    []string{WebhookClientName},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, p.WebhookClientCert, p.WebhookClientKey); err != nil {
		return nil, err
	}
	// '*': the credentials for every webhook the apiserver calls.
	kubeconfig := filepath.Join(dir, "webhook-client.kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\nusers:\n- name: '*'\n  user:\n"+
		"    client-certificate: "+p.WebhookClientCert+"\n    client-key: "+p.WebhookClientKey+"\n"), 0o600); err != nil {
		return nil, err
	}
	plugin := func(name string) string {
		return "- name: " + name + "\n  configuration:\n    apiVersion: apiserver.config.k8s.io/v1\n" +
			"    kind: WebhookAdmissionConfiguration\n    kubeConfigFile: " + kubeconfig + "\n"
	}
	admission := "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n" +
		plugin("ValidatingAdmissionWebhook") + plugin("MutatingAdmissionWebhook")
	if err := os.WriteFile(p.AdmissionConfig, []byte(admission), 0o644); err != nil {
		return nil, err
	}
	return p, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}
