#include "kernels/cpu/expert_choice.h"

#include <algorithm>
#include <vector>

namespace moeserve::cpu {

void ExpertChoiceSelect(const ExpertChoiceArgs& a) {
#pragma omp parallel if (a.num_experts * a.num_rows > 65536)
  {
    std::vector<int32_t> order;
#pragma omp for schedule(static)
    for (int64_t e = 0; e < a.num_experts; ++e) {
      order.assign(a.rows, a.rows + a.num_rows);
      auto better = [&](int32_t x, int32_t y) {
        const float sx = a.scores[x * a.num_experts + e], sy = a.scores[y * a.num_experts + e];
        return sx != sy ? sx > sy : x < y;
      };
      // nth_element then sort of the chosen prefix: O(T + C log C).
      if (a.capacity < a.num_rows) {
        std::nth_element(order.begin(), order.begin() + a.capacity, order.end(), better);
      }
      std::sort(order.begin(), order.begin() + a.capacity, better);
      std::copy_n(order.begin(), a.capacity, a.selected + e * a.capacity);
    }
  }
}

}  // namespace moeserve::cpu
