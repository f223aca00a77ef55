# frozen_string_literal: true

require_relative "thruster/version"
require_relative "thruster/conflict"
require_relative "thruster/binary"

# thruster-rs: a zero-config HTTP/2 proxy for Puma/Rails apps, with a Rust
# core. Run it as a wrapper (`bundle exec thrust bin/rails server`) or inside
# the Puma master (`plugin :thruster_rs` in config/puma.rb).
module Thruster
  class Error < StandardError; end

  # A configuration value that is not accepted; the message names the
  # setting, the value and what is accepted.
  class ConfigError < Error; end

  # The Rack middleware that turns on X-Sendfile for proxied requests
  # (lib/thruster/sendfile.rb; needs Rack, so loaded on first use).
  autoload :Sendfile, File.expand_path("thruster/sendfile", __dir__)

  # The compiled extension for this Ruby: a platform gem ships one per Ruby
  # minor version under thruster/<major.minor>/, a source build one at
  # thruster/.
  def self.load_native
    minor = RUBY_VERSION[/\A\d+\.\d+/]
    begin
      require_relative "thruster/#{minor}/thruster_rs"
    rescue LoadError
      require_relative "thruster/thruster_rs"
    end
    return if Native.core_version == VERSION

    warn "thruster-rs: the compiled extension is version #{Native.core_version}, " \
         "the Ruby files #{VERSION}; run `rake compile` (or reinstall the gem)"
  end
end

Thruster::Conflict.warn_if_present
Thruster.load_native
require_relative "thruster/api"
require_relative "thruster/purge"
# The Railtie, now if Rails is loaded, else when the app class is defined.
require_relative "thruster/railtie_hook"
