# frozen_string_literal: true

require_relative "lib/thruster/version"

Gem::Specification.new do |s|
  s.name = "thruster-rs"
  s.version = Thruster::VERSION
  s.summary = "Zero-config HTTP/2 proxy for Puma/Rails, with a Rust core"
  s.description = "A drop-in for basecamp's Thruster: `thrust bin/rails server` puts a Rust proxy " \
                  "(HTTP/2, TLS, caching, compression, X-Sendfile) in front of any Rack server."
  s.authors = ["thruster-rs developers"]
  s.license = "MIT"
  s.required_ruby_version = ">= 3.1"
  s.metadata["rubygems_mfa_required"] = "true"

  s.files = Dir["lib/**/*.rb", "exe/*", "ext/**/*.{rb,rs,toml,ld}", "Cargo.toml", "Cargo.lock",
                "README.md", "docs/*.md", "CHANGELOG.md", "LICENSE"]
  s.bindir = "exe"
  s.executables = ["thrust"]
  s.extensions = ["ext/thruster_rs/extconf.rb"]
  s.require_paths = ["lib"]

  s.add_development_dependency "puma", ">= 5.6"
  s.add_development_dependency "rack", ">= 2.2"
  s.add_development_dependency "rake", ">= 13.0"
  s.add_development_dependency "rspec", ">= 3.12"
end
