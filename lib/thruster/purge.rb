# frozen_string_literal: true

# Thruster.purge: drops cached responses through the proxy's admin listener.
module Thruster
  # (Also in thruster.rb; repeated so this file loads on its own, without the
  # compiled extension.)
  class Error < StandardError; end

  # Set for the app (by `thrust`, or by the in-process proxy in the Puma
  # master before it forks workers): where Thruster.purge sends purges.
  ADMIN_URL_ENV = "THRUSTER_RS_ADMIN_URL"
  ADMIN_TOKEN_ENV = "THRUSTER_RS_ADMIN_TOKEN"

  # A purge the proxy did not take: no proxy to reach, a refused target,
  # or no answer in time.
  class PurgeError < Error; end

  class << self
    # Drops cached responses from every tier of the proxy's cache (memory,
    # disk and, with CACHE_REDIS_URL, every instance sharing the Redis):
    #
    #   Thruster.purge("/posts/1")                    # that request target (query included)
    #   Thruster.purge("https://example.com/posts/1") # the same: the host is ignored
    #   Thruster.purge("/posts/*")                    # every target starting with /posts/
    #   Thruster.purge("*")                           # everything
    #
    # Works wherever the app's code runs (a Puma worker, a console or a job
    # in the same container): it calls the proxy's loopback admin listener.
    # Returns the proxy's answer as a Hash ("purged", and "shared": "ok", an
    # error text when Redis did not take it — the local tiers are purged
    # anyway — or nil without Redis). Raises Thruster::PurgeError otherwise.
    def purge(target, timeout: 5)
      require "net/http"
      require "json"
      url = ENV.fetch(ADMIN_URL_ENV, "")
      token = ENV.fetch(ADMIN_TOKEN_ENV, "")
      if url.empty? || token.empty?
        raise PurgeError, "no thruster-rs proxy to purge: #{ADMIN_URL_ENV} is not set " \
                          "(run the app under `thrust` or with `plugin :thruster_rs`)"
      end

      post_purge(URI("#{url}/purge"), target.to_s, token, Float(timeout))
    end

    private

    def post_purge(uri, target, token, timeout)
      response = Net::HTTP.start(uri.host, uri.port, open_timeout: timeout, read_timeout: timeout,
                                                     write_timeout: timeout) do |http|
        http.post(uri.path, target, "Authorization" => "Bearer #{token}", "Content-Type" => "text/plain")
      end
      unless response.is_a?(Net::HTTPSuccess)
        raise PurgeError, "the proxy refused the purge of #{target.inspect}: " \
                          "#{response.code} #{response.body.to_s.strip}"
      end

      JSON.parse(response.body)
    rescue SystemCallError, IOError, Timeout::Error, JSON::ParserError => e
      raise PurgeError, "could not reach the proxy's admin listener at #{uri}: #{e.class}: #{e.message}"
    end
  end
end
