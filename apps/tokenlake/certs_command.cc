// `tokenlake certs --out DIR [--host NAME]... [--ca DIR] [--days N]`: the cluster's TLS files
// (transport/tls.h). Without --ca it makes a new cluster CA (DIR/ca.pem, DIR/ca-key.pem) and a
// certificate for this host; with --ca it signs a new host's certificate with that folder's CA,
// so that every host has its own key and only the issuing folder holds the CA's key. Prints what
// it wrote as one JSON object.
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/time/time.h"
#include "command.h"
#include "nlohmann/json.hpp"
#include "tokenlake/transport/tls.h"

namespace {

struct CertsFlags {
  std::string out_dir;
  std::vector<std::string> hosts;
  std::string ca_dir;
  int days = 365;
};

int RunCerts(const CertsFlags& flags) {
  absl::StatusOr<tokenlake::transport::TlsIdentity> id =
      tokenlake::transport::MakeClusterCertificates({.out_dir = flags.out_dir,
                                                     .hosts = flags.hosts,
                                                     .valid_for = absl::Hours(24) * flags.days,
                                                     .ca_dir = flags.ca_dir});
  if (!id.ok()) {
    std::fprintf(stderr, "tokenlake certs: %s\n", std::string(id.status().message()).c_str());
    return absl::IsInvalidArgument(id.status()) || absl::IsNotFound(id.status()) ? 2 : 1;
  }
  nlohmann::ordered_json out;
  out["dir"] = flags.out_dir;
  out["new_ca"] = flags.ca_dir.empty();
  out["names"] = id->names;
  out["not_after"] = absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", id->not_after, absl::UTCTimeZone());
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

void SetUpCerts(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<CertsFlags>();
  CLI::App* cmd = app.add_subcommand(
      "certs", "Make the cluster's TLS files: a CA and this host's certificate and key");
  cmd->add_option("--out", flags->out_dir, "Folder to write ca.pem, cert.pem, key.pem into")
      ->required();
  cmd->add_option("--host", flags->hosts,
                  "A DNS name or IP address of this host (repeatable; localhost, 127.0.0.1 and "
                  "::1 are always included)");
  cmd->add_option("--ca", flags->ca_dir,
                  "Sign with the CA in this folder (ca.pem, ca-key.pem) instead of making one")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--days", flags->days, "Validity in days")
      ->check(CLI::Range(1, 36500))
      ->capture_default_str();
  cmd->callback([flags, exit_code] { *exit_code = RunCerts(*flags); });
}

}  // namespace

TOKENLAKE_REGISTER_COMMAND(certs, SetUpCerts);
