#include "tokenlake/transport/tls.h"

#include <arpa/inet.h>
#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tokenlake::transport {
namespace {

struct Free {
  void operator()(X509* p) const { X509_free(p); }
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(BIO* p) const { BIO_free(p); }
  void operator()(X509_STORE* p) const { X509_STORE_free(p); }
  void operator()(X509_STORE_CTX* p) const { X509_STORE_CTX_free(p); }
  void operator()(X509_EXTENSION* p) const { X509_EXTENSION_free(p); }
  void operator()(GENERAL_NAMES* p) const { GENERAL_NAMES_free(p); }
  void operator()(BIGNUM* p) const { BN_free(p); }
};
template <typename T>
using Ptr = std::unique_ptr<T, Free>;

// The OpenSSL error queue's last entry, as text (and the queue cleared).
std::string SslError() {
  unsigned long last = 0;
  while (unsigned long e = ERR_get_error()) last = e;
  if (last == 0) return "no OpenSSL error recorded";
  char buf[256];
  ERR_error_string_n(last, buf, sizeof(buf));
  return buf;
}

absl::Status Internal(const std::string& step) {
  return absl::InternalError(absl::StrCat("TLS: ", step, ": ", SslError()));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("TLS file ", path, " cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::Status WriteFile(const std::string& path, const std::string& text, bool secret) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
    out << text;
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
  }
  if (secret && chmod(tmp.c_str(), 0600) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("cannot chmod 0600 ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec)
    return absl::PermissionDeniedError(absl::StrCat("cannot write ", path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::StatusOr<Ptr<X509>> ParseCert(const std::string& pem, const std::string& path) {
  Ptr<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Ptr<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS file ", path, " is not a PEM certificate: ", SslError()));
  }
  return cert;
}

absl::StatusOr<Ptr<EVP_PKEY>> ParseKey(const std::string& pem, const std::string& path) {
  Ptr<BIO> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Ptr<EVP_PKEY> key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS file ", path, " is not a PEM private key: ", SslError()));
  }
  return key;
}

std::string CertPem(X509* cert) {
  Ptr<BIO> bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), cert);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string KeyPem(EVP_PKEY* key) {
  Ptr<BIO> bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

bool IsIp(const std::string& host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

bool IsDnsName(const std::string& host) {
  if (host.empty() || host.size() > 253) return false;
  for (char c : host) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') return false;
  }
  return host.front() != '.' && host.front() != '-';
}

absl::Time AsnTime(const ASN1_TIME* t) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return absl::InfinitePast();
  return absl::FromUnixSeconds(timegm(&tm));
}

std::vector<std::string> AltNames(X509* cert) {
  std::vector<std::string> names;
  Ptr<GENERAL_NAMES> alt(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  if (alt == nullptr) return names;
  for (int i = 0; i < sk_GENERAL_NAME_num(alt.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(alt.get(), i);
    if (name->type == GEN_DNS) {
      const ASN1_STRING* s = name->d.dNSName;
      names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                         static_cast<size_t>(ASN1_STRING_length(s)));
    } else if (name->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* s = name->d.iPAddress;
      char text[INET6_ADDRSTRLEN] = {};
      const int family = ASN1_STRING_length(s) == 4 ? AF_INET : AF_INET6;
      if (inet_ntop(family, ASN1_STRING_get0_data(s), text, sizeof(text)) != nullptr) {
        names.emplace_back(text);
      }
    }
  }
  return names;
}

absl::Status AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  Ptr<X509_EXTENSION> ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (ext == nullptr || X509_add_ext(cert, ext.get(), -1) != 1) {
    return Internal(absl::StrCat("extension ", OBJ_nid2sn(nid), " = ", value));
  }
  return absl::OkStatus();
}

absl::StatusOr<Ptr<X509>> MakeCert(const std::string& common_name, EVP_PKEY* key, X509* issuer,
                                   EVP_PKEY* issuer_key, bool is_ca,
                                   const std::vector<std::string>& alt_names,
                                   absl::Duration valid_for) {
  Ptr<X509> cert(X509_new());
  if (cert == nullptr || X509_set_version(cert.get(), 2) != 1) return Internal("X509_new");
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof(serial)) != 1) return Internal("RAND_bytes");
  serial[0] &= 0x7f;  // positive
  Ptr<BIGNUM> bn(BN_bin2bn(serial, sizeof(serial), nullptr));
  if (bn == nullptr || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return Internal("serial number");
  }
  // Valid from an hour ago: hosts' clocks differ a little.
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), absl::ToInt64Seconds(valid_for));
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("TokenLake cluster"), -1, -1,
                             0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                             0);
  X509* signer = issuer != nullptr ? issuer : cert.get();
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(signer)) != 1 ||
      X509_set_pubkey(cert.get(), key) != 1) {
    return Internal("certificate names and key");
  }
  if (is_ca) {
    if (absl::Status s =
            AddExtension(cert.get(), signer, NID_basic_constraints, "critical,CA:TRUE");
        !s.ok()) {
      return s;
    }
    if (absl::Status s =
            AddExtension(cert.get(), signer, NID_key_usage, "critical,keyCertSign,cRLSign");
        !s.ok()) {
      return s;
    }
  } else {
    for (const auto& [nid, value] : std::vector<std::pair<int, std::string>>{
             {NID_basic_constraints, "critical,CA:FALSE"},
             {NID_key_usage, "critical,digitalSignature,keyEncipherment"},
             {NID_ext_key_usage, "serverAuth,clientAuth"}}) {
      if (absl::Status s = AddExtension(cert.get(), signer, nid, value); !s.ok()) return s;
    }
    std::vector<std::string> entries;
    for (const std::string& n : alt_names) entries.push_back((IsIp(n) ? "IP:" : "DNS:") + n);
    if (absl::Status s =
            AddExtension(cert.get(), signer, NID_subject_alt_name, absl::StrJoin(entries, ","));
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = AddExtension(cert.get(), signer, NID_subject_key_identifier, "hash");
      !s.ok()) {
    return s;
  }
  if (X509_sign(cert.get(), issuer_key != nullptr ? issuer_key : key, EVP_sha256()) == 0) {
    return Internal("X509_sign");
  }
  return cert;
}

// Verifies `cert` against the single trusted `ca`, now.
absl::Status Verify(X509* ca, X509* cert, const std::string& cert_path) {
  Ptr<X509_STORE> store(X509_STORE_new());
  Ptr<X509_STORE_CTX> ctx(X509_STORE_CTX_new());
  if (store == nullptr || ctx == nullptr || X509_STORE_add_cert(store.get(), ca) != 1 ||
      X509_STORE_CTX_init(ctx.get(), store.get(), cert, nullptr) != 1) {
    return Internal("certificate store");
  }
  if (X509_verify_cert(ctx.get()) != 1) {
    const int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return absl::InvalidArgumentError(
        absl::StrCat("TLS file ", cert_path,
                     " does not verify against the CA: ", X509_verify_cert_error_string(err)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TlsIdentity> LoadTlsIdentity(const std::string& dir) {
  const std::string ca_path = dir + "/ca.pem";
  const std::string cert_path = dir + "/cert.pem";
  const std::string key_path = dir + "/key.pem";
  TlsIdentity id;
  id.dir = dir;
  for (auto [path, out] : {std::pair{&ca_path, &id.ca_pem}, std::pair{&cert_path, &id.cert_pem},
                           std::pair{&key_path, &id.key_pem}}) {
    absl::StatusOr<std::string> text = ReadFile(*path);
    if (!text.ok()) {
      return absl::NotFoundError(absl::StrCat(text.status().message(),
                                              " (a TLS folder holds ca.pem, cert.pem and key.pem; "
                                              "`tokenlake certs --out DIR` makes one)"));
    }
    *out = *std::move(text);
  }
  absl::StatusOr<Ptr<X509>> ca = ParseCert(id.ca_pem, ca_path);
  if (!ca.ok()) return ca.status();
  absl::StatusOr<Ptr<X509>> cert = ParseCert(id.cert_pem, cert_path);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<Ptr<EVP_PKEY>> key = ParseKey(id.key_pem, key_path);
  if (!key.ok()) return key.status();
  if (X509_check_private_key(cert->get(), key->get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(
        absl::StrCat("TLS file ", key_path, " is not the key of ", cert_path));
  }
  if (absl::Status s = Verify(ca->get(), cert->get(), cert_path); !s.ok()) return s;
  id.names = AltNames(cert->get());
  id.not_after = AsnTime(X509_get0_notAfter(cert->get()));
  return id;
}

absl::StatusOr<TlsIdentity> MakeClusterCertificates(const CertificateOptions& options) {
  if (options.out_dir.empty()) return absl::InvalidArgumentError("certificates: no output folder");
  if (options.valid_for <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("certificates: the validity must be positive");
  }
  std::vector<std::string> names;
  for (const std::string& host : options.hosts) {
    if (!IsIp(host) && !IsDnsName(host)) {
      return absl::InvalidArgumentError(
          absl::StrCat("certificates: host '", host, "' is neither a DNS name nor an IP address"));
    }
    names.push_back(host);
  }
  for (const char* local : {"localhost", "127.0.0.1", "::1"}) {
    if (std::find(names.begin(), names.end(), local) == names.end()) names.emplace_back(local);
  }
  std::error_code ec;
  std::filesystem::create_directories(options.out_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("certificates: cannot create ", options.out_dir, ": ", ec.message()));
  }

  Ptr<X509> ca;
  Ptr<EVP_PKEY> ca_key;
  if (options.ca_dir.empty()) {
    ca_key.reset(EVP_EC_gen("P-256"));
    if (ca_key == nullptr) return Internal("CA key");
    absl::StatusOr<Ptr<X509>> made = MakeCert("TokenLake cluster CA", ca_key.get(), nullptr,
                                              nullptr, /*is_ca=*/true, {}, options.valid_for);
    if (!made.ok()) return made.status();
    ca = *std::move(made);
    if (absl::Status s = WriteFile(options.out_dir + "/ca-key.pem", KeyPem(ca_key.get()), true);
        !s.ok()) {
      return s;
    }
  } else {
    const std::string ca_path = options.ca_dir + "/ca.pem";
    const std::string ca_key_path = options.ca_dir + "/ca-key.pem";
    absl::StatusOr<std::string> ca_pem = ReadFile(ca_path);
    if (!ca_pem.ok()) return ca_pem.status();
    absl::StatusOr<std::string> ca_key_pem = ReadFile(ca_key_path);
    if (!ca_key_pem.ok()) return ca_key_pem.status();
    absl::StatusOr<Ptr<X509>> parsed = ParseCert(*ca_pem, ca_path);
    if (!parsed.ok()) return parsed.status();
    absl::StatusOr<Ptr<EVP_PKEY>> parsed_key = ParseKey(*ca_key_pem, ca_key_path);
    if (!parsed_key.ok()) return parsed_key.status();
    ca = *std::move(parsed);
    ca_key = *std::move(parsed_key);
    if (X509_check_private_key(ca.get(), ca_key.get()) != 1) {
      ERR_clear_error();
      return absl::InvalidArgumentError(
          absl::StrCat("TLS file ", ca_key_path, " is not the key of ", ca_path));
    }
  }

  Ptr<EVP_PKEY> key(EVP_EC_gen("P-256"));
  if (key == nullptr) return Internal("host key");
  absl::StatusOr<Ptr<X509>> cert = MakeCert(names.front(), key.get(), ca.get(), ca_key.get(),
                                            /*is_ca=*/false, names, options.valid_for);
  if (!cert.ok()) return cert.status();
  if (absl::Status s = WriteFile(options.out_dir + "/key.pem", KeyPem(key.get()), true); !s.ok()) {
    return s;
  }
  if (absl::Status s = WriteFile(options.out_dir + "/cert.pem", CertPem(cert->get()), false);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = WriteFile(options.out_dir + "/ca.pem", CertPem(ca.get()), false); !s.ok()) {
    return s;
  }
  return LoadTlsIdentity(options.out_dir);
}

}  // namespace tokenlake::transport
