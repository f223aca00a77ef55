# frozen_string_literal: true

module Thruster
  # Finds the compiled `thrust` wrapper binary: next to this file after
  # `rake compile` or in an installed gem, else in the gem's extension dir.
  module Binary
    NAME = "thrust"

    def self.path
      candidates.find { |candidate| File.file?(candidate) && File.executable?(candidate) }
    end

    def self.candidates
      list = [File.expand_path(NAME, __dir__)]
      spec = Gem.loaded_specs["thruster-rs"]
      list << File.join(spec.extension_dir, "thruster", NAME) if spec.respond_to?(:extension_dir)
      list
    end
  end
end
