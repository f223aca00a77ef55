# frozen_string_literal: true

require "rack/utils"

# Loadable on its own (`require "thruster/sendfile"`): needs Rack, not the
# compiled extension.
module Thruster
  # The request header in which the proxy sends its per-boot token on every
  # upstream request (overwriting any value a client sent; left out when
  # X_SENDFILE_ENABLED is false).
  SENDFILE_TOKEN_HEADER = "X-Thruster-Sendfile-Token"
  # Where the app process finds the same token: `thrust` sets it for its
  # child, the in-process mode before Puma forks its workers.
  SENDFILE_TOKEN_ENV = "THRUSTER_RS_SENDFILE_TOKEN"

  # Turns on X-Sendfile in Rack::Sendfile for requests that came through
  # the thruster-rs proxy, and only for those.
  #
  # Rack 2.2.20+ and 3.1.18+ (CVE-2025-61780) no longer read the
  # X-Sendfile-Type request header, since a client talking to the app
  # directly could send it too. A request proves it came through the proxy
  # by carrying the proxy's token; this middleware then sets
  # env["sendfile.type"] = "X-Sendfile", which Rack::Sendfile still honours
  # (an explicit variation, such as Rails' config.action_dispatch
  # .x_sendfile_header, takes precedence).
  #
  # It must run before Rack::Sendfile. The Railtie puts it there in Rails
  # apps; in a plain Rack app:
  #
  #   require "thruster/sendfile"
  #   use Thruster::Sendfile
  #   use Rack::Sendfile
  #
  # The token header is removed from every request, so the app never sees
  # it. Everything else is left alone: a client's X-Sendfile-Type header is
  # neither honoured nor removed (current Rack ignores it; see X-Sendfile in
  # docs/configuration.md).
  class Sendfile
    RACK_HEADER = "HTTP_#{SENDFILE_TOKEN_HEADER.upcase.tr('-', '_')}".freeze
    TYPE_KEY = "sendfile.type"
    VARIATION = "X-Sendfile"

    def initialize(app)
      @app = app
    end

    def call(env)
      sent = env.delete(RACK_HEADER)
      env[TYPE_KEY] ||= VARIATION if from_proxy?(sent)
      @app.call(env)
    end

    private

    # The expected token is read per request, so a proxy restarted with a
    # new token (and the app with it) is picked up without caching.
    def from_proxy?(sent)
      expected = ENV.fetch(SENDFILE_TOKEN_ENV, nil)
      return false if expected.nil? || expected.empty? || sent.nil? || sent.empty?

      Rack::Utils.secure_compare(expected, sent)
    end
  end
end
